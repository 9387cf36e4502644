"""Sampler truncation against transformers' warpers, empirical token frequencies, and per-request seeds."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lm_core.generation_config import GenerationConfig
from lm_torch.sampling import Sampler, SamplingInputs, ops


def build(configs, vocab, generators=None, outputs=None):
    n = len(configs)
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    generators = generators if generators is not None else [None] * n
    return SamplingInputs.build(configs, [[] for _ in range(n)], outputs, None, vocab, "cpu", generators)


def reference_warped(logits, cfg):
    """One row [vocab] through transformers' warpers in their `generate` order: temperature, top-k, top-p, min-p."""
    scores, ids = logits[None].clone(), torch.zeros(1, 1, dtype=torch.int64)
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    if cfg.min_p:
        scores = MinPLogitsWarper(cfg.min_p)(ids, scores)
    return scores[0]


def sampled_logits(logits, configs):
    """The logits the sampler draws from (processed, then truncated): [batch, vocab]."""
    sampler = Sampler()
    inputs = build(configs, logits.shape[1])
    return sampler.truncate(sampler.processed_logits(logits, inputs), inputs)


def assert_same_distribution(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    torch.testing.assert_close(actual.softmax(-1), expected.softmax(-1), rtol=1e-5, atol=1e-6)


row_config = st.builds(
    lambda t, k, p, m: GenerationConfig(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=m),
    st.sampled_from([1.0, 0.3, 0.8, 1.5]),
    st.sampled_from([0, 0, 1, 5, 20]),
    st.sampled_from([1.0, 1.0, 0.5, 0.9, 0.99]),
    st.sampled_from([0.0, 0.0, 0.05, 0.3]),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(configs=st.lists(row_config, min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_truncation_equals_transformers_warpers_row_by_row(configs, seed):
    # Mixed batches take every path: top-p over top-k candidates or over a full sort, on some rows or all.
    logits = torch.randn(len(configs), 64, generator=torch.Generator().manual_seed(seed)) * 2.5
    # Rank only 8 candidates for top-p rows without top-k, so flat rows take the full-sort fallback.
    with mock.patch.object(ops, "TOP_P_CANDIDATES", 8):
        got = sampled_logits(logits, configs)
    for i, cfg in enumerate(configs):
        assert_same_distribution(got[i], reference_warped(logits[i], cfg))


@pytest.mark.parametrize("bf16", [False, True])
def test_thresholds_do_not_depend_on_how_many_candidates_are_ranked(bf16):
    # Peaked rows find their nucleus among 8 candidates; flat ones fall back to a full sort. bf16 logits add ties.
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * torch.tensor([8.0, 0.3] * 4)[:, None]
    if bf16:
        logits = logits.to(torch.bfloat16).float()
    top_k = torch.tensor([0, 0, 5, 8, 3, 0, 8, 0])
    top_p = torch.tensor([0.9, 0.8, 0.95, 1.0, 0.5, 0.99, 0.7, 1.0])
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0])
    exact = ops.truncation_thresholds(logits, None, top_k, top_p, min_p, 300)
    assert torch.equal(ops.truncation_thresholds(logits, None, top_k, top_p, min_p, 8), exact)
    rows = torch.tensor([1, 2, 5])  # the same rows alone
    alone = ops.truncation_thresholds(logits[rows], None, top_k[rows], top_p[rows], min_p[rows], 8)
    assert torch.equal(alone, exact[rows])
    if not bf16:
        for i in range(8):
            cfg = GenerationConfig(do_sample=True, top_k=int(top_k[i]), top_p=float(top_p[i]), min_p=float(min_p[i]))
            kept = logits[i] >= exact[i]
            assert torch.equal(kept, torch.isfinite(reference_warped(logits[i], cfg)))


def test_tied_logits_at_a_cut_are_kept_together():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0, 1.0, 3.0, -1.0]] * 2)
    # top-k 2 falls inside the tie at 3.0; top-p 0.6 ends inside it (each 3.0 holds ~0.29 of the mass).
    threshold = ops.truncation_thresholds(logits, None, torch.tensor([2, 0]), torch.tensor([1.0, 0.6]), None, 8)
    assert threshold.flatten().tolist() == [3.0, 3.0]


# Each case keeps at least 3 tokens and drops at least 3, so every stage matters.
CASES = {
    "temperature": GenerationConfig(do_sample=True, temperature=0.7),
    "top_k": GenerationConfig(do_sample=True, top_k=5),
    "top_p": GenerationConfig(do_sample=True, top_p=0.8),
    "min_p": GenerationConfig(do_sample=True, min_p=0.12),
    "all": GenerationConfig(do_sample=True, temperature=1.4, top_k=9, top_p=0.9, min_p=0.05),
}
VOCAB_SMALL = 12
DRAWS = 50_000


def assert_frequencies_match(tokens, probs):
    """Each token's frequency is within 5 standard errors (+1e-3) of its probability; tokens of probability 0 never
    come. For one token the miss chance is below 1e-6, so across the ~60 comparisons of this file below 1e-4."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    freq = counts / len(tokens)
    for token, p in enumerate(probs.double().tolist()):
        if p == 0.0:
            assert counts[token] == 0, f"token {token} has probability 0 but was drawn"
        else:
            bound = 5 * math.sqrt(p * (1 - p) / len(tokens)) + 1e-3
            assert abs(float(freq[token]) - p) < bound, f"token {token}: frequency {float(freq[token])} vs p={p}"


@pytest.mark.parametrize("case", list(CASES))
def test_empirical_frequencies_match_the_reference_distribution(case):
    cfg = CASES[case]
    row = torch.randn(VOCAB_SMALL, generator=torch.Generator().manual_seed(11)) * 1.5
    probs = reference_warped(row, cfg).softmax(-1)
    assert 3 <= int((probs > 0).sum()) <= VOCAB_SMALL - (0 if case == "temperature" else 3)
    # One row per draw: the batch holds the same logits DRAWS times, sharing the sampler's default generator.
    tokens = Sampler(torch.Generator().manual_seed(12))(row.expand(DRAWS, -1), build([cfg] * DRAWS, VOCAB_SMALL))
    assert_frequencies_match(tokens.token_ids, probs)


def test_seeded_rows_are_distributed_like_the_reference():
    cfg = CASES["all"].replace(random_seed=0)
    row = torch.randn(VOCAB_SMALL, generator=torch.Generator().manual_seed(13)) * 1.5
    probs = reference_warped(row, cfg).softmax(-1)
    # Every row draws from its own generator (seeds 0..DRAWS-1): one draw each.
    generators = [torch.Generator().manual_seed(i) for i in range(DRAWS)]
    out = Sampler()(row.expand(DRAWS, -1), build([cfg] * DRAWS, VOCAB_SMALL, generators))
    assert_frequencies_match(out.token_ids, probs)


def run_request(cfg, steps, row_logits, position, others, other_generators):
    """Tokens a request with `cfg` samples over `steps` steps at `position` of a batch with `others`."""
    generator = torch.Generator().manual_seed(cfg.random_seed)
    sampler = Sampler(torch.Generator().manual_seed(position + 100))
    tokens, output = [], []
    for step in range(steps):
        configs = [*others[:position], cfg, *others[position:]]
        gens = [*other_generators[:position], generator, *other_generators[position:]]
        filler = torch.randn(len(others), row_logits.shape[1], generator=torch.Generator().manual_seed(step))
        logits = torch.cat([filler[:position], row_logits[step][None], filler[position:]])
        outputs = [[] for _ in others]
        outputs.insert(position, list(output))
        out = sampler(logits, build(configs, row_logits.shape[1], gens, outputs))
        token = int(out.token_ids[position])
        tokens.append(token)
        output.append(token)
    return tokens


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(do_sample=True, temperature=1.2, random_seed=1234),
        GenerationConfig(do_sample=True, top_k=40, top_p=0.95, random_seed=7),
        GenerationConfig(do_sample=True, min_p=0.01, presence_penalty=0.5, random_seed=99),
    ],
)
def test_a_seeded_request_samples_the_same_tokens_whatever_else_is_in_the_batch(cfg):
    vocab, steps = 500, 8
    row_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(5)) * 0.5
    alone = run_request(cfg, steps, row_logits, 0, [], [])
    others = [
        GenerationConfig(),
        GenerationConfig(do_sample=True, top_p=0.5),
        GenerationConfig(do_sample=True, top_k=3, random_seed=1, repetition_penalty=1.5),
        GenerationConfig(do_sample=True, temperature=0.5, min_p=0.2, logprobs=3),
    ]
    other_generators = [None, None, torch.Generator().manual_seed(1), None]
    for position in (0, 2, 4):
        assert run_request(cfg, steps, row_logits, position, others, other_generators) == alone
    assert run_request(cfg, steps, row_logits, 1, others[1:2], [None]) == alone
    # Another seed gives another sequence (500 near-flat tokens over 8 steps: a clash is vanishingly unlikely).
    assert run_request(cfg.replace(random_seed=cfg.random_seed + 1), steps, row_logits, 0, [], []) != alone


def test_each_sampling_row_takes_exactly_one_draw_from_its_generator_and_greedy_rows_none():
    configs = [GenerationConfig(do_sample=True, random_seed=3), GenerationConfig(random_seed=4)]
    generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    Sampler()(torch.randn(2, 30), build(configs, 30, generators))
    expected = torch.Generator().manual_seed(3)
    torch.rand(1, generator=expected)
    assert torch.equal(generators[0].get_state(), expected.get_state())
    assert torch.equal(generators[1].get_state(), torch.Generator().manual_seed(4).get_state())


def test_inverse_cdf_never_draws_zero_probability_tokens_even_at_the_edges():
    logits = torch.full((4, 6), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 3] = 1.0
    uniforms = torch.tensor([0.0, 0.5, 1.0 - 2**-24, 0.999999])
    assert ops.sample_inverse_cdf(logits, None, uniforms).tolist() == [2, 3, 3, 3]
    # The same through a threshold on finite logits: tokens below it weigh nothing.
    finite = torch.tensor([[0.5, -3.0, 0.0, 1.0, -1.0, 0.9]] * 4)
    assert ops.sample_inverse_cdf(finite, torch.full((4, 1), 1.0), uniforms).tolist() == [3, 3, 3, 3]
