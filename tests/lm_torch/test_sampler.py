"""Sampler logits processing, greedy decoding and logprobs, checked against transformers' logits processors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from lm_core.generation_config import GenerationConfig
from lm_torch.sampling import Sampler, SamplingInputs, validate_config

VOCAB = 40


def build(configs, prompts=None, outputs=None, bad_words=None, vocab=VOCAB, generators=None):
    n = len(configs)
    return SamplingInputs.build(
        configs,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        bad_words,
        vocab,
        "cpu",
        generators if generators is not None else [None] * n,
    )


def reference_processed(logits, cfg, prompt, output, bad_words=()):
    """One row [vocab] through transformers' processors (plus a plain loop for presence/frequency), then temperature."""
    scores = logits[None].clone()  # [1, vocab]
    ids = torch.tensor([list(prompt) + list(output)], dtype=torch.int64)
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    for token, count in Counter(output).items():
        scores[0, token] -= cfg.frequency_penalty * count + cfg.presence_penalty
    if cfg.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in cfg.logit_bias.items()})(ids, scores)
    banned = [list(w) for w in bad_words] + [[t] for t in cfg.bad_token_ids or []]
    if banned:
        scores = NoBadWordsLogitsProcessor(banned)(ids, scores)
    if cfg.min_new_tokens:
        stops = cfg.stop_token_ids or []
        scores = MinNewTokensLengthLogitsProcessor(len(prompt), cfg.min_new_tokens, stops)(ids, scores)
    if not cfg.is_greedy and cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    return scores[0]


def assert_same_logits(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-6, atol=1e-6)


def random_logits(rows, vocab=VOCAB, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


PROMPTS = [[1, 2, 3, 2], [5, 6], [7], [0, 9, 9, 8, 1]]
OUTPUTS = [[3, 3, 4], [], [7, 7, 7, 11], [12, 1]]


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    configs = [GenerationConfig(repetition_penalty=p) for p in (1.3, 0.7, 1.0, 2.5)]
    # Row 3 passes its ids as tensors (a runner may cache them): same result.
    prompts = [*PROMPTS[:3], torch.tensor(PROMPTS[3])]
    outputs = [*OUTPUTS[:3], torch.tensor(OUTPUTS[3])]
    logits = random_logits(4)
    got = Sampler().processed_logits(logits, build(configs, prompts, outputs))
    for i, cfg in enumerate(configs):
        assert_same_logits(got[i], reference_processed(logits[i], cfg, PROMPTS[i], OUTPUTS[i]))


def test_presence_and_frequency_penalties_equal_a_reference_loop_over_the_output_only():
    configs = [
        GenerationConfig(frequency_penalty=0.5),
        GenerationConfig(presence_penalty=1.5),
        GenerationConfig(frequency_penalty=-0.3, presence_penalty=0.8),
        GenerationConfig(),
    ]
    logits = random_logits(4, seed=1)
    got = Sampler().processed_logits(logits, build(configs, PROMPTS, OUTPUTS))
    for i, cfg in enumerate(configs):
        expected = logits[i].clone()
        for t in range(VOCAB):
            count = OUTPUTS[i].count(t)  # prompt tokens don't count
            expected[t] -= cfg.frequency_penalty * count + (cfg.presence_penalty if count else 0.0)
        torch.testing.assert_close(got[i], expected)


def test_all_processing_stages_together_equal_transformers():
    bad_words = [[[3, 4], [2, 9]], [[6, 30]], [], [[9, 8, 1, 12, 5], [1, 13]]]
    configs = [
        GenerationConfig(repetition_penalty=1.2, frequency_penalty=0.4, logit_bias={4: 3.0, 9: -2.0}),
        GenerationConfig(do_sample=True, temperature=0.6, presence_penalty=1.0, bad_token_ids=[5, 6]),
        GenerationConfig(min_new_tokens=5, stop_token_ids=[13, 14], logit_bias={13: 50.0}, repetition_penalty=0.9),
        GenerationConfig(do_sample=True, temperature=1.7, bad_token_ids=[0]),
    ]
    logits = random_logits(4, seed=2)
    got = Sampler().processed_logits(logits, build(configs, PROMPTS, OUTPUTS, bad_words))
    for i, cfg in enumerate(configs):
        assert_same_logits(got[i], reference_processed(logits[i], cfg, PROMPTS[i], OUTPUTS[i], bad_words[i]))


def test_bad_words_equal_transformers_no_bad_words_processor():
    # Prefixes matched in the output, across the prompt/output boundary, in the prompt alone, too long, or not at all.
    prompts = [[1, 2], [1, 2, 3], [4, 5, 6], [7], [8, 9]]
    outputs = [[3, 4], [], [7], [], [10]]
    words = [[[3, 4, 20], [4, 21], [22]], [[2, 3, 23]], [[6, 7, 24], [5, 6, 25]], [[1, 7, 26]], [[9, 11, 27]]]
    configs = [GenerationConfig()] * 5
    logits = random_logits(5, seed=3)
    got = Sampler().processed_logits(logits, build(configs, prompts, outputs, words))
    for i in range(5):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = NoBadWordsLogitsProcessor(words[i])(ids, logits[i][None].clone())[0]
        assert_same_logits(got[i], expected)
    banned = [set(torch.nonzero(torch.isneginf(row)).flatten().tolist()) for row in got]
    assert banned == [{20, 21, 22}, {23}, {24}, set(), set()]


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_new_tokens_masks_stop_ids_like_transformers(generated):
    cfg = GenerationConfig(min_new_tokens=3, stop_token_ids=[7, 9])
    prompt, output = [1, 2, 3], list(range(10, 10 + generated))
    logits = random_logits(1, seed=4)
    got = Sampler().processed_logits(logits, build([cfg], [prompt], [output]))[0]
    ids = torch.tensor([prompt + output])
    expected = MinNewTokensLengthLogitsProcessor(len(prompt), 3, [7, 9])(ids, logits.clone())[0]
    assert_same_logits(got, expected)
    assert bool(torch.isneginf(got[7])) == (generated < 3)


def test_ignore_eos_leaves_eos_unmasked_under_min_new_tokens():
    eos = 2
    # lm-core drops EOS from stop_token_ids when ignore_eos is set; only the remaining stop ids are held back.
    cfg = GenerationConfig(ignore_eos=True, min_new_tokens=4, stop_token_ids=[11])
    logits = torch.zeros(1, VOCAB)
    logits[0, eos] = 10.0
    out = Sampler()(logits, build([cfg], outputs=[[5]]))
    assert out.token_ids.tolist() == [eos]
    got = Sampler().processed_logits(logits, build([cfg], outputs=[[5]]))[0]
    assert torch.isneginf(got).nonzero().flatten().tolist() == [11]


def test_greedy_takes_argmax_of_transformers_processed_logits():
    bad_words = [[[3, 4]], [], [[9, 8, 1, 12, 5]], [[1, 13]]]
    configs = [
        GenerationConfig(repetition_penalty=1.5, logit_bias={4: 1.0}),
        GenerationConfig(do_sample=True, temperature=0.0, presence_penalty=2.0, frequency_penalty=1.0, top_k=3),
        GenerationConfig(min_new_tokens=9, stop_token_ids=[0, 1], bad_token_ids=[2]),
        GenerationConfig(repetition_penalty=0.5, bad_token_ids=[12]),
    ]
    logits = random_logits(4, seed=5, scale=1.0)
    # Put the raw arg-max on tokens the processors push down or mask, so processing must decide.
    logits[0, 3] = logits[1, 7] = logits[2, 0] = logits[3, 12] = 10.0
    inputs = build(configs, PROMPTS, OUTPUTS, bad_words)
    assert inputs.all_greedy
    out = Sampler()(logits, inputs)
    expected = [
        int(reference_processed(logits[i], c, PROMPTS[i], OUTPUTS[i], bad_words[i]).argmax())
        for i, c in enumerate(configs)
    ]
    assert out.token_ids.tolist() == expected
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_mixed_batch_keeps_greedy_rows_greedy():
    configs = [GenerationConfig(), GenerationConfig(do_sample=True, temperature=5.0), GenerationConfig()] * 10
    logits = random_logits(30, seed=6)
    out = Sampler(torch.Generator().manual_seed(0))(logits, build(configs))
    greedy_rows = [i for i in range(30) if i % 3 != 1]
    assert out.token_ids[greedy_rows].tolist() == logits[greedy_rows].argmax(-1).tolist()
    # At temperature 5 over 40 tokens, some of the 10 sampling rows leave the arg-max.
    assert out.token_ids[1::3].tolist() != logits[1::3].argmax(-1).tolist()


def test_a_tiny_temperature_is_greedy_with_finite_logprobs():
    """Dividing logits by 1e-300 overflows float32 (inf - inf = NaN): below the floor a row is greedy instead."""
    tiny = GenerationConfig(do_sample=True, temperature=1e-300, top_p=0.9, logprobs=2)
    logits = random_logits(16, seed=9)
    out = Sampler(torch.Generator().manual_seed(0))(logits, build([tiny] * 16))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    reference = torch.log_softmax(logits, dim=-1)
    for row, entry in enumerate(out.logprobs):
        token = out.token_ids[row].item()
        assert entry[token] == pytest.approx(reference[row, token].item(), abs=1e-5)


def test_logprobs_equal_log_softmax_of_the_processed_logits():
    configs = [
        GenerationConfig(do_sample=True, temperature=0.5, top_k=3, repetition_penalty=1.3, logprobs=5),
        GenerationConfig(logprobs=2, temperature=0.5, logit_bias={1: 4.0}),  # greedy: temperature not applied
        GenerationConfig(do_sample=True, top_p=0.5, min_p=0.2, bad_token_ids=[0, 1], logprobs=20),
        GenerationConfig(do_sample=True, temperature=1.3),  # no logprobs asked
    ]
    logits = random_logits(4, seed=7)
    out = Sampler(torch.Generator().manual_seed(1))(logits, build(configs, PROMPTS, OUTPUTS))
    assert out.logprobs is not None and out.logprobs[3] is None
    for i, cfg in enumerate(configs[:3]):
        reference = torch.log_softmax(reference_processed(logits[i], cfg, PROMPTS[i], OUTPUTS[i]), dim=-1)
        entry = out.logprobs[i]
        top = reference.topk(cfg.logprobs).indices.tolist()
        sampled = int(out.token_ids[i])
        assert set(entry) == {*top, sampled}  # truncation (top-k/top-p/min-p) doesn't change them
        for token, value in entry.items():
            assert value == pytest.approx(float(reference[token]), abs=1e-5)


def test_logprobs_include_the_sampled_token_outside_the_top_n():
    configs = [GenerationConfig(do_sample=True, temperature=3.0, logprobs=n) for n in (0, 1) * 20]
    logits = random_logits(40, seed=8, scale=0.5)
    out = Sampler(torch.Generator().manual_seed(2))(logits, build(configs))
    outside = 0
    for i, entry in enumerate(out.logprobs):
        n, sampled = configs[i].logprobs, int(out.token_ids[i])
        reference = torch.log_softmax(logits[i] / 3.0, dim=-1)
        assert sampled in entry and len(entry) <= n + 1
        expected_keys = {sampled} | set(reference.topk(n).indices.tolist())
        assert set(entry) == expected_keys
        assert entry[sampled] == pytest.approx(float(reference[sampled]), abs=1e-5)
        outside += sampled not in reference.topk(max(n, 1)).indices.tolist()
    assert outside > 0  # near-flat logits: many rows sampled below the top 1


def test_padded_vocab_columns_are_never_picked():
    configs = [
        GenerationConfig(),
        GenerationConfig(do_sample=True, logprobs=3),
        GenerationConfig(do_sample=True, repetition_penalty=1.3, frequency_penalty=0.5),  # [rows, vocab] stages
    ]
    logits = torch.zeros(3, VOCAB + 8)
    logits[:, VOCAB:] = 100.0
    out = Sampler()(logits, build(configs, [[1, 2]] * 3, [[3]] * 3))
    assert all(t < VOCAB for t in out.token_ids.tolist())
    assert all(t < VOCAB for t in out.logprobs[1])


def test_input_logits_are_not_modified_and_half_precision_is_upcast():
    configs = [GenerationConfig(do_sample=True, top_k=2, top_p=0.5, repetition_penalty=2.0, bad_token_ids=[1])]
    logits = random_logits(1, seed=9).to(torch.bfloat16)
    before = logits.clone()
    inputs = build(configs, [[0, 1, 2]])
    out = Sampler()(logits, inputs)
    assert torch.equal(logits, before)
    assert Sampler().processed_logits(logits, inputs).dtype == torch.float32
    assert out.token_ids.shape == (1,)


def test_out_of_vocab_ids_are_ignored_by_build_and_rejected_by_validate_config():
    cfg = GenerationConfig(logit_bias={VOCAB + 5: 3.0}, bad_token_ids=[VOCAB], stop_token_ids=[VOCAB + 1])
    penalized = cfg.replace(min_new_tokens=2, repetition_penalty=1.5, frequency_penalty=1.0)
    inputs = build([penalized], [torch.tensor([VOCAB + 9])], [[VOCAB + 2]], [[[VOCAB + 3]]])
    logits = random_logits(1, seed=10)
    torch.testing.assert_close(Sampler().processed_logits(logits, inputs), logits)
    with pytest.raises(ValueError, match="logit_bias"):
        validate_config(cfg, VOCAB)
    with pytest.raises(ValueError, match="bad_token_ids"):
        validate_config(GenerationConfig(bad_token_ids=[VOCAB]), VOCAB)
    validate_config(GenerationConfig(logit_bias={VOCAB - 1: 1.0}), VOCAB)


def test_shape_and_length_mismatches_raise():
    with pytest.raises(ValueError, match="differ in length"):
        SamplingInputs.build([GenerationConfig()], [[]], [], None, VOCAB, "cpu", [None])
    inputs = build([GenerationConfig()] * 2)
    with pytest.raises(ValueError, match="don't fit"):
        Sampler()(torch.zeros(3, VOCAB), inputs)
    with pytest.raises(ValueError, match="don't fit"):
        Sampler()(torch.zeros(2, VOCAB - 1), inputs)


def test_stages_no_row_uses_are_skipped():
    inputs = build([GenerationConfig(), GenerationConfig(do_sample=True)])
    assert inputs.temperature is None and inputs.top_k is None and inputs.top_p is None and inputs.min_p is None
    assert not inputs.any_penalty and inputs.bias_index is None and inputs.ban_index is None
    inputs = build([GenerationConfig(), GenerationConfig(do_sample=True, top_p=0.9, frequency_penalty=0.1)])
    assert inputs.truncate_rows.tolist() == [1] and inputs.penalty_rows.tolist() == [1]
    assert inputs.seen_mask is None and inputs.output_counts.shape == (1, VOCAB)


def test_an_empty_batch_samples_nothing():
    out = Sampler()(torch.zeros(0, VOCAB), build([]))
    assert out.token_ids.shape == (0,) and out.logprobs is None


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logits_for_argmax_pick_the_float32_logits_token(softcap):
    """Greedy steps take the arg-max of the lm_head's own bf16 output: the same token as of the float32 logits, ties
    (first index) included; soft-capped logits stay float32."""
    from transformers import Gemma2Config, LlamaConfig

    from lm_torch.models.gemma import GemmaForCausalLM
    from lm_torch.models.llama import LlamaForCausalLM
    from lm_torch.sampling.ops import argmax_rows

    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=2048,
    )
    if softcap is None:
        model = LlamaForCausalLM(LlamaConfig(**common), max_positions=64)
    else:
        model = GemmaForCausalLM(Gemma2Config(**common, final_logit_softcapping=softcap), max_positions=64)
    model = model.to(torch.bfloat16)
    # Rows 1-2 of the weight repeated further on: hidden states meeting them tie, and the first copy must win.
    with torch.no_grad():
        model.lm_head.weight[1500:1502] = model.lm_head.weight[1:3]
    hidden = torch.randn(64, 32, dtype=torch.bfloat16)
    hidden[:8] = model.lm_head.weight[1:3].repeat(4, 1) * 50
    fast = model.compute_logits(hidden, for_argmax=True)
    exact = model.compute_logits(hidden)
    assert exact.dtype == torch.float32
    assert fast.dtype == (torch.bfloat16 if softcap is None else torch.float32)
    assert torch.equal(argmax_rows(fast), argmax_rows(exact))
    assert torch.equal(argmax_rows(exact), exact.argmax(dim=-1))
    assert (argmax_rows(exact)[:8] < 3).all()  # the ties went to the first copies


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_building_inputs_and_sampling_on_cuda_never_wait_for_the_stream():
    """With overlapped steps the host builds step N + 1's sampling inputs while the GPU runs step N: no stage but
    top-p's fallback may synchronise (logprobs are read later, from pinned copies). torch's sync debug mode raises on
    every synchronising call."""
    vocab, device = 300, torch.device("cuda")
    configs = [
        GenerationConfig(do_sample=True, temperature=0.7, top_k=20, min_p=0.05),
        GenerationConfig(do_sample=True, temperature=1.3, repetition_penalty=1.2, presence_penalty=0.5, logprobs=3),
        GenerationConfig(do_sample=True, frequency_penalty=0.4, logit_bias={5: 3.0}, bad_token_ids=[7, 8]),
        GenerationConfig(max_new_tokens=4, min_new_tokens=2, stop_token_ids=[9], bad_words=["x"]),
    ]
    prompts = [[1, 2, 3], [4, 5, 5], [6], [10, 11, 12]]
    outputs = [[13], [5, 14], [15, 15], [16]]
    bad_words = [None, None, None, [[16, 7]]]  # row 3 ends with 16: its next token may not be 7
    generators = [torch.Generator().manual_seed(11), None, torch.Generator().manual_seed(3), None]
    logits = torch.randn(len(configs), vocab + 12, device=device)  # a padded LM head
    logits[2, [7, 8]] = 30.0  # banned: without the ban they would be drawn
    logits[3, 9], logits[3, 7] = 50.0, 40.0  # row 3 is greedy: the stop id, then the bad word's last token
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        inputs = SamplingInputs.build(configs, prompts, outputs, bad_words, vocab, device, generators)
        out = Sampler()(logits, inputs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    tokens = out.token_ids.tolist()
    reference = Sampler().processed_logits(logits, inputs)[1].log_softmax(-1)  # row 1's distribution, float32
    logprobs = out.logprobs  # read now, from the pinned copies
    assert [row is None for row in logprobs] == [True, False, True, True]
    assert tokens[1] in logprobs[1] and len(logprobs[1]) in (3, 4)  # the top 3 and the sampled token
    for token, value in logprobs[1].items():
        assert abs(value - reference[token].item()) < 1e-5
    assert all(0 <= t < vocab for t in tokens)
    assert tokens[0] in logits[0, :vocab].topk(20).indices.tolist()  # top-k
    assert tokens[2] not in (7, 8)  # bans
    assert tokens[3] not in (9, 7)  # min_new_tokens holds back the stop id; the bad word's last token is banned
