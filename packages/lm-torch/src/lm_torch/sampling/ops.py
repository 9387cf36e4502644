"""Batched logits stages of the sampler, on float32 `logits: [batch, vocab]` with one setting per row.

Truncation (top-k, top-p, min-p) is expressed as one threshold logit per row: a token survives when its logit is at
least its row's threshold. Thresholds are values, not positions, so tied logits (common once bf16 logits are upcast)
are kept or dropped together, and a row's result depends neither on the order a sort puts ties in nor on the rest of
the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
# Rows with top-p but no top-k first look for their nucleus among this many most likely tokens; rows whose nucleus
# is wider (a flat distribution) fall back to sorting their whole vocabulary.
TOP_P_CANDIDATES = 1024


def _rows_of(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows a stage works on: `x` itself when `rows` is None (all rows), else a gathered copy."""
    return x if rows is None else x.index_select(0, rows)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The first arg-max of each row of logits [rows, V] (torch.argmax's answer), [rows] int64.

    A row is cut into chunks of a few hundred columns when V allows: the per-chunk maxima and then the best chunk
    are two short parallel reductions, where one reduction over a whole 128k-column row takes a single block of the
    GPU and is several times slower. Ties keep the first index: the first chunk holding the maximum, and the
    first position within it.
    """
    rows, width = logits.shape
    chunk = next((c for c in range(1024, 255, -1) if width % c == 0), None)
    if chunk is None or width < 4 * chunk:
        return logits.argmax(dim=-1)
    values, positions = logits.view(rows, width // chunk, chunk).max(dim=-1)  # [rows, chunks] each
    best = values.argmax(dim=-1, keepdim=True)  # [rows, 1]
    return (best * chunk + positions.gather(1, best)).squeeze(1)


def apply_token_bitmask(
    logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor, vocab_size: int
) -> None:
    """In place: -inf on every token a row's bitmask disallows (guided decoding).

    logits: [batch, V]; rows: [G] int64 batch rows the bitmask rows belong to (None: all rows, G == batch);
    bitmask: [G, W] int32 on the logits' device, W * 32 >= vocab_size, xgrammar's layout: token t is allowed iff bit
    t % 32 of word t // 32 is set. Columns at or past `vocab_size` (a padded vocabulary) are disallowed.
    """
    width = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # An arithmetic shift keeps the sign bit, but `& 1` reads only the shifted-down bit, so bit 31 is read right too.
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : min(vocab_size, width)].bool()  # [G, <= V]
    if allowed.shape[1] < width:
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
    if rows is None:
        logits.masked_fill_(~allowed, NEG_INF)
    else:
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(~allowed, NEG_INF))


def apply_penalties(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    repetition_penalty: torch.Tensor | None,
    seen_mask: torch.Tensor | None,
    frequency_penalty: torch.Tensor | None,
    presence_penalty: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> None:
    """In place: repetition penalty (transformers' rule), then frequency and presence penalties (OpenAI's rule).

    rows: [P] batch rows the penalty tensors belong to (None: all rows); repetition_penalty: [P];
    seen_mask: [P, vocab] bool; frequency_penalty, presence_penalty: [P]; output_counts: [P, vocab].
    """
    sub = _rows_of(logits, rows)  # [P, vocab]
    if seen_mask is not None and repetition_penalty is not None:
        penalty = repetition_penalty[:, None]
        # Dividing a negative logit would raise it, so negative logits are multiplied instead.
        penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
        sub = torch.where(seen_mask, penalized, sub)
    if output_counts is not None and frequency_penalty is not None and presence_penalty is not None:
        sub = sub - frequency_penalty[:, None] * output_counts - presence_penalty[:, None] * (output_counts > 0)
    if rows is None:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, rows, sub)


def truncation_thresholds(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    width: int,
) -> torch.Tensor | None:
    """Per row the smallest logit that top-k, then top-p, then min-p keep: [batch, 1] (-inf keeps all).

    rows: [T] rows with top-k or top-p (None: all); top_k: [batch] int64, 0 = off; top_p: [batch] in (0, 1], 1 = off;
    min_p: [batch], 0 = off; width: how many most likely tokens to rank, at least the largest top_k (see
    `candidate_width`). Returns None when no stage is on.
    As transformers chains its warpers, top-p measures mass over what top-k kept; min-p compares with the top token,
    which every stage keeps, so its order doesn't matter.
    """
    batch = logits.shape[0]
    threshold = None
    if top_k is not None or top_p is not None:
        sub = _rows_of(logits, rows)  # [T, vocab]
        k = None if top_k is None else _rows_of(top_k, rows)[:, None]  # [T, 1]
        p = None if top_p is None else _rows_of(top_p, rows)[:, None]  # [T, 1]
        values = sub.topk(width, dim=-1).values  # [T, width], descending; no full sort
        sub_threshold = torch.full_like(values[:, :1], NEG_INF)  # [T, 1]
        if k is not None:
            kth = values.gather(1, (k - 1).clamp(min=0))
            sub_threshold = torch.where(k > 0, kth, sub_threshold)
        if p is not None:
            sub_threshold = torch.maximum(sub_threshold, _top_p_threshold(sub, values, p, sub_threshold))
        if rows is None:
            threshold = sub_threshold
        else:
            threshold = torch.full((batch, 1), NEG_INF, device=logits.device).index_copy_(0, rows, sub_threshold)
    if min_p is not None:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf keeps every token.
        min_p_threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
        threshold = min_p_threshold if threshold is None else torch.maximum(threshold, min_p_threshold)
    return threshold


def candidate_width(top_k_max: int, top_p_without_top_k: bool, vocab: int) -> int:
    """How many most likely tokens `truncation_thresholds` ranks: enough for every top-k, and for top-p rows without
    one a first guess at their nucleus."""
    return min(vocab, max(top_k_max, TOP_P_CANDIDATES if top_p_without_top_k else 1))


def _top_p_threshold(sub: torch.Tensor, values: torch.Tensor, p: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The smallest logit of each row's nucleus: [T, 1].

    sub: [T, vocab]; values: [T, C] the C largest of sub, descending; p: [T, 1]; floor: [T, 1] the top-k threshold.
    """
    top = values[:, :1]  # [T, 1]
    # Normaliser of the top-k-truncated distribution, over the whole row so that C candidates suffice.
    total = (sub - top).exp_().masked_fill_(sub < floor, 0.0).sum(dim=-1, keepdim=True)  # [T, 1]
    threshold, resolved = _nucleus_cutoff(values, p, floor, top, total, sub.shape[1])
    # One host sync (only when some row has top-p): rows whose nucleus reaches past the candidates sort their whole
    # vocabulary instead.
    if not bool(resolved.all()):
        rows = torch.nonzero(~resolved).squeeze(1)
        ranked = sub.index_select(0, rows).sort(dim=-1, descending=True).values  # [rows, vocab]
        picked = (p[rows], floor[rows], top[rows], total[rows])
        threshold = threshold.index_copy(0, rows, _nucleus_cutoff(ranked, *picked, sub.shape[1])[0])
    return torch.where(p < 1, threshold, NEG_INF)


def _nucleus_cutoff(
    values: torch.Tensor, p: torch.Tensor, floor: torch.Tensor, top: torch.Tensor, total: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, 1] nucleus threshold, [T] bool whether `values` [T, C] held the whole nucleus)."""
    probs = ((values - top).exp() / total).masked_fill_(values < floor, 0.0)  # [T, C]
    inclusive = probs.cumsum(dim=-1)
    exclusive = F.pad(inclusive[:, :-1], (1, 0))  # mass strictly more likely than each candidate
    # transformers drops a token when the mass at or below it is <= 1 - top_p: it keeps those with less than top_p
    # above them. The most likely token has 0 above it, so at least one token stays.
    count = ((exclusive < p) & (values >= floor)).sum(dim=-1, keepdim=True).clamp_(min=1)  # [T, 1]
    threshold = values.gather(1, count - 1)
    if values.shape[1] == vocab:
        return threshold, torch.ones_like(count, dtype=torch.bool).squeeze(1)
    complete = (inclusive[:, -1:] >= p) | (values[:, -1:] < floor) | (p >= 1)
    return threshold, complete.squeeze(1)


def apply_threshold(logits: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """In place: -inf below each row's threshold ([batch, 1]); returns `logits`."""
    if threshold is not None:
        logits.masked_fill_(logits < threshold, NEG_INF)
    return logits


def sample_inverse_cdf(logits: torch.Tensor, threshold: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(logits) restricted to logits >= threshold, by inverting the CDF.

    logits: [rows, vocab]; threshold: [rows, 1] or None; uniform: [rows] in [0, 1), one draw per row, so a row's token
    depends only on its own logits and draw. The CDF runs in vocabulary order (never in a sort's order, which ties
    would make arbitrary). Tokens of probability 0 are never drawn. Returns [rows] int64.
    """
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # [rows, vocab], unnormalised probabilities
    if threshold is not None:
        weights.masked_fill_(logits < threshold, 0.0)
    cdf = weights.cumsum_(dim=-1)  # non-decreasing
    total = cdf[:, -1:]  # [rows, 1]
    # Stay strictly below the total so the search never runs off the end onto a zero-probability tail token.
    target = torch.minimum(uniform[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first index whose cumulative weight exceeds the target: a zero-weight token never qualifies. A row with no
    # allowed token at all (NaN weights) gets some in-range id, which its grammar (the only way there) then rejects.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)
