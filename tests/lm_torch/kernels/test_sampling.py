"""The sampling kernel draws exactly the plain-torch sampler's tokens from the same uniforms."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference

VOCAB = 1100  # more than one block of the kernel's loop (512 in the interpreter, 2048 compiled: see the GPU test)

# Per row: temperature (<= 0 greedy), top_k (0 off), top_p (1 off), min_p (0 off).
ROWS = [
    (0.0, 0, 1.0, 0.0),  # greedy
    (0.7, 0, 1.0, 0.0),  # temperature only
    (1.0, 1, 1.0, 0.0),  # top-k 1: the arg-max
    (1.0, 5, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.3, 50, 0.8, 0.0),  # top-p over what top-k kept
    (1.0, 0, 1.0, 0.1),
    (0.8, 20, 0.95, 0.05),
    (1.0, VOCAB, 1.0, 0.0),  # top-k of the whole vocabulary: off
    (2.0, 0, 0.3, 0.0),
    (1.0, 0, 1.0, 0.5),
    (1.0, 0, 1e-3, 0.0),  # a nucleus of one token
    (1.0, 700, 0.999, 0.0),
    (0.5, 3, 0.5, 0.2),
]


def _params(case, rows, gen):
    temperature, top_k, top_p, min_p = (torch.tensor(col) for col in zip(*rows, strict=True))
    uniforms = torch.rand(len(rows), generator=gen)
    return [t.to(case.device) for t in (temperature.float(), top_k.long(), top_p.float(), min_p.float(), uniforms)]


def _check(case, logits, temperature, top_k, top_p, min_p, uniforms, vocab_size=None):
    from lm_torch.kernels.sampling import sample

    tokens, thresholds = sample(logits, temperature, uniforms, top_k, top_p, min_p, vocab_size=vocab_size)
    expected_tokens, expected_thresholds = reference.sample(
        logits, temperature, top_k, top_p, min_p, uniforms, vocab_size
    )
    assert torch.equal(thresholds.cpu(), expected_thresholds.cpu())
    assert torch.equal(tokens.cpu(), expected_tokens.cpu())
    return tokens


def test_sample_matches_torch_sampler(case):
    gen = torch.Generator().manual_seed(0)
    logits = case.randn(len(ROWS), VOCAB, generator=gen, scale=3.0)
    _check(case, logits, *_params(case, ROWS, gen))


def test_sample_with_ties(case):
    # Logits on a coarse grid: many ties at every top-k / top-p edge, which must be kept or dropped together.
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randint(-6, 7, (len(ROWS), VOCAB), generator=gen).float() / 2).to(case.device, case.dtype)
    _check(case, logits, *_params(case, ROWS, gen))


def test_sample_inverts_the_cdf_at_every_uniform(case):
    # One row's distribution under 48 different uniforms spanning [0, 1): every draw lands on the reference token.
    gen = torch.Generator().manual_seed(2)
    row = case.randn(1, 300, generator=gen, scale=2.0)
    logits = row.expand(48, 300).contiguous()
    params = _params(case, [(0.9, 40, 0.9, 0.02)] * 48, gen)
    params[-1] = (torch.arange(48, dtype=torch.float32) / 48).to(case.device)
    tokens = _check(case, logits, *params)
    assert len(set(tokens.tolist())) > 5  # the sweep reaches many tokens, not one


def test_sample_random_settings(case):
    # Many random (temperature, k, p, min_p) combinations, k and p across their whole ranges.
    gen = torch.Generator().manual_seed(5)
    num_rows, vocab = 32, 257
    rows = [
        (
            float(torch.rand(1, generator=gen)) * 2 + 0.05,
            int(torch.randint(0, vocab + 5, (1,), generator=gen)),
            float(torch.rand(1, generator=gen)) * 0.999 + 0.001,
            float(torch.rand(1, generator=gen)) * 0.3,
        )
        for _ in range(num_rows)
    ]
    logits = case.randn(num_rows, vocab, generator=gen, scale=2.0)
    _check(case, logits, *_params(case, rows, gen))


def test_sample_ignores_padded_vocab_and_absent_stages(case):
    from lm_torch.kernels.sampling import sample

    gen = torch.Generator().manual_seed(3)
    logits = case.randn(4, 320, generator=gen)
    logits[:, 300:] = 50.0  # a padded LM head's columns: never drawn, even when they dominate
    temperature = torch.tensor([0.0, 1.0, 1.0, 0.5], device=case.device)
    uniforms = torch.rand(4, generator=gen).to(case.device)
    tokens, _ = sample(logits, temperature, uniforms, vocab_size=300)
    assert (tokens < 300).all()
    expected, _ = reference.sample(
        logits,
        temperature,
        torch.zeros(4, dtype=torch.long, device=case.device),
        torch.ones(4, device=case.device),
        torch.zeros(4, device=case.device),
        uniforms,
        300,
    )
    assert torch.equal(tokens.cpu(), expected.cpu())


def test_sample_large_vocab(case):
    """A Llama-3 vocabulary (128256) in several compiled blocks, at a batch that fills part of the GPU."""
    if case.device == "cpu":
        pytest.skip("too large for the interpreter")
    gen = torch.Generator().manual_seed(4)
    rows = ROWS * 4
    logits = case.randn(len(rows), 128256, generator=gen, scale=4.0)
    params = _params(case, [(t, k if k != VOCAB else 128256, p, m) for t, k, p, m in rows], gen)
    _check(case, logits, *params)


def test_sample_rejects_bad_shapes(case):
    from lm_torch.kernels.sampling import sample

    pytest.importorskip("triton")
    logits = case.randn(2, 10, generator=torch.Generator())
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, torch.ones(3, device=case.device), torch.rand(2).to(case.device))
