"""Time lm-torch's Triton kernels on a CUDA GPU against plain torch, for the Llama-3-8B attention shape.

Decode attention (32 query heads over 8 kv heads, head_dim 128, bf16, 16-token blocks) at batch 1/64/256 and
contexts 512/2048, against `torch.nn.functional.scaled_dot_product_attention` on K/V already gathered into
contiguous tensors (the cost of attention alone) and on K/V gathered from the paged cache first (what the torch
backend pays). Every kernel is timed as CUDA-graph replays (`triton.testing.do_bench_cudagraph`, median), which also
checks that it captures. Also: prefill attention and the sampling kernel.

Usage: python benchmarks/kernel_times.py [--batches 1 64 256] [--contexts 512 2048] [--splits 0 4 8 16]
    [--kv-quant 0 8 4]
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def _bench(fn, graph: bool = True) -> float:
    """Median microseconds of one call, replayed from a CUDA graph (or launched eagerly, `graph=False`)."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    if not graph:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000.0
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1000.0


def _paged_cache(batch: int, context: int, dtype, gen):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device="cuda", generator=gen)  # shuffled blocks, as a busy server's are
    tables = order.view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def _decode_row(batch: int, context: int, split_choices, dtype, gen, quant_policy: int = 0) -> str:
    from lm_torch.kernels.decode_attention import choose_num_splits, decode_attention
    from lm_torch.kv_quant import dequantize_kv, quantize_kv, scales_dtype

    scale = 1 / math.sqrt(HEAD_DIM)
    k_cache, v_cache, tables = _paged_cache(batch, context, dtype, gen)
    quantized = {}
    if quant_policy:
        # int8 / int4 codes with per-token, per-head scales and zeros; the reference attends the values they encode.
        k_codes, k_sz = quantize_kv(k_cache, quant_policy, scales_dtype(dtype))
        v_codes, v_sz = quantize_kv(v_cache, quant_policy, scales_dtype(dtype))
        k_cache = dequantize_kv(k_codes, k_sz, quant_policy, dtype)
        v_cache = dequantize_kv(v_codes, v_sz, quant_policy, dtype)
        quantized = {"k_scales_zeros": k_sz, "v_scales_zeros": v_sz}
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    starts = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    kernel_k, kernel_v = (k_codes, v_codes) if quant_policy else (k_cache, v_cache)

    def triton_decode(splits):
        return lambda: decode_attention(
            q,
            kernel_k,
            kernel_v,
            tables,
            starts,
            lens,
            scale,
            max_context_len=context,
            num_splits=splits,
            out=out,
            **quantized,
        )

    # SDPA on contiguous K/V: [batch, kv heads, context, head_dim].
    keys = k_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    values = v_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    queries = q.unsqueeze(2)

    def sdpa():
        return F.scaled_dot_product_attention(queries, keys, values, scale=scale, enable_gqa=True)

    def gather_sdpa():
        k = k_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(queries, k, v, scale=scale, enable_gqa=True)

    default_splits = choose_num_splits(batch, NUM_KV_HEADS, context, q.device)
    triton_decode(default_splits)()
    error = (out.float() - sdpa().squeeze(2).float()).abs().max().item()
    per_token = kernel_k[0, 0].numel() * kernel_k.element_size()
    if quant_policy:
        per_token += quantized["k_scales_zeros"][0, 0].numel() * quantized["k_scales_zeros"].element_size()
    bytes_read = 2 * batch * context * per_token  # K and V, scales and zeros included
    default = _bench(triton_decode(default_splits))
    others = " ".join(f"{n}:{_bench(triton_decode(n)):.1f}" for n in split_choices if n and n != default_splits)
    t_sdpa, t_gather = _bench(sdpa), _bench(gather_sdpa)
    label = f"int{quant_policy}" if quant_policy else str(dtype).removeprefix("torch.")
    return (
        f"| {label} | {batch} | {context} | {default_splits} | {default:.1f} | "
        f"{bytes_read / default / 1e3:.0f} | "
        f"{others or '-'} | {t_sdpa:.1f} | {t_gather:.1f} | {t_sdpa / default:.2f}x | {error:.1e} |"
    )


def decode_table(batches, contexts, split_choices, dtype=torch.bfloat16, quant_policies=(0,)) -> list[str]:
    """One row per (KV cache policy, batch, context). With a quantized cache, "SDPA" attends the dequantized values
    (what the codes encode), and GB/s counts the codes and their scales and zeros."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [
        "| KV cache | batch | context | splits | Triton decode (us) | GB/s | other splits (us) | "
        "SDPA, K/V contiguous (us) | gather + SDPA (us) | SDPA / Triton | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in quant_policies:
        for batch in batches:
            for context in contexts:
                rows.append(_decode_row(batch, context, split_choices, dtype, gen, policy))
                torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    return rows


def _prefill_row(batch: int, length: int, dtype, gen) -> str:
    from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

    scale = 1 / math.sqrt(HEAD_DIM)
    k_cache, v_cache, tables = _paged_cache(batch, length, dtype, gen)
    q = torch.randn(batch * length, NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    starts = torch.arange(0, batch * length + 1, length, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    per_tile = tokens_per_tile(NUM_HEADS // NUM_KV_HEADS)
    tile_seq, tile_first = prefill_tiles([length] * batch, per_tile, "cuda")
    out = torch.empty_like(q)

    def triton_prefill():
        return prefill_attention(
            q, k_cache, v_cache, tables, starts, lens, tile_seq, tile_first, scale, tokens_per_tile=per_tile, out=out
        )

    keys = k_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :length].transpose(1, 2).contiguous()
    values = v_cache[tables].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :length].transpose(1, 2).contiguous()
    queries = q.view(batch, length, NUM_HEADS, HEAD_DIM).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)

    triton_prefill()
    expected = sdpa().transpose(1, 2).reshape(batch * length, NUM_HEADS, HEAD_DIM)
    error = (out.float() - expected.float()).abs().max().item()
    flops = 4 * batch * length * length / 2 * NUM_HEADS * HEAD_DIM  # causal: half the score matrix
    t_triton, t_sdpa = _bench(triton_prefill), _bench(sdpa)
    return (
        f"| {batch} x {length} | {t_triton:.0f} | {flops / t_triton / 1e6:.0f} | {t_sdpa:.0f} | "
        f"{flops / t_sdpa / 1e6:.0f} | {error:.1e} |"
    )


def prefill_table(dtype=torch.bfloat16) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = [
        "| prompts x tokens | Triton prefill (us) | TFLOP/s | SDPA causal, K/V contiguous (us) | TFLOP/s | "
        "max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for batch, length in ((1, 2048), (4, 512), (1, 8192)):
        rows.append(_prefill_row(batch, length, dtype, gen))
        torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    return rows


def _sampling_row(batch: int, gen) -> str:
    from lm_torch.kernels.sampling import sample

    vocab = 128256
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 4
    temperature = torch.full((batch,), 0.8, device="cuda")
    uniforms = torch.rand(batch, device="cuda", generator=gen)
    top_k = torch.full((batch,), 50, device="cuda", dtype=torch.long)
    top_p = torch.full((batch,), 0.9, device="cuda")
    min_p = torch.full((batch,), 0.05, device="cuda")
    t_plain = _bench(lambda: sample(logits, temperature, uniforms))
    t_k = _bench(lambda: sample(logits, temperature, uniforms, top_k=top_k))
    t_p = _bench(lambda: sample(logits, temperature, uniforms, top_p=top_p))
    t_all = _bench(lambda: sample(logits, temperature, uniforms, top_k, top_p, min_p))

    def torch_sort_top_p():
        # What a sort-based top-p costs in torch: sort, softmax, cumsum, mask, multinomial.
        scaled = logits / temperature[:, None]
        values, indices = scaled.sort(dim=-1, descending=True)
        probs = values.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p[:, None]
        probs = probs.masked_fill(drop, 0.0)
        return indices.gather(1, torch.multinomial(probs, 1))

    t_sort = _bench(torch_sort_top_p, graph=False)  # multinomial may not capture: eager launches
    return f"| {batch} | {t_plain:.0f} | {t_k:.0f} | {t_p:.0f} | {t_all:.0f} | {t_sort:.0f} |"


def sampling_table() -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows = [
        "| batch | temperature only (us) | + top-k 50 (us) | + top-p 0.9 (us) | top-k + top-p + min-p (us) | "
        "torch sort-based top-p, eager (us) |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1, 64, 256):
        rows.append(_sampling_row(batch, gen))
        print(rows[-1], flush=True)
    return rows


PREFILL_SHAPES = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (256, 64, 8, 2)]
SAMPLING_SHAPES = [(2048, 8), (4096, 8), (8192, 16), (16384, 32)]


def tuning_table() -> list[str]:
    """Launch shapes of the prefill and sampling kernels, to pick their defaults."""
    from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile
    from lm_torch.kernels.sampling import sample

    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = ["| kernel | shape | launch | us |", "|---|---|---|---|"]
    scale = 1 / math.sqrt(HEAD_DIM)
    for batch, length in ((4, 512), (1, 8192)):
        k_cache, v_cache, tables = _paged_cache(batch, length, torch.bfloat16, gen)
        q = torch.randn(batch * length, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        starts = torch.arange(0, batch * length + 1, length, device="cuda", dtype=torch.int32)
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        for tile_rows, block_n, warps, stages in PREFILL_SHAPES:
            per_tile = tokens_per_tile(NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, tile_rows)
            tiles = prefill_tiles([length] * batch, per_tile, "cuda")
            run = functools.partial(
                prefill_attention,
                q,
                k_cache,
                v_cache,
                tables,
                starts,
                lens,
                *tiles,
                scale,
                tokens_per_tile=per_tile,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
            )
            launch = f"rows {tile_rows} n {block_n} w {warps} s {stages}"
            try:
                timing = f"{_bench(run):.0f}"
            except Exception as error:  # a launch shape that does not fit (shared memory) is a result too
                timing = f"failed: {type(error).__name__}"
            rows.append(f"| prefill | {batch} x {length} | {launch} | {timing} |")
            print(rows[-1], flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    for batch in (1, 256):
        logits = torch.randn(batch, 128256, device="cuda", generator=gen) * 4
        temperature = torch.full((batch,), 0.8, device="cuda")
        uniforms = torch.rand(batch, device="cuda", generator=gen)
        top_k = torch.full((batch,), 50, device="cuda", dtype=torch.long)
        top_p = torch.full((batch,), 0.9, device="cuda")
        for block, warps in SAMPLING_SHAPES:
            for label, k, p in (("temperature", None, None), ("top-k 50 + top-p 0.9", top_k, top_p)):
                run = functools.partial(sample, logits, temperature, uniforms, k, p, block=block, num_warps=warps)
                launch = f"block {block} w {warps}"
                rows.append(f"| sample, {label} | batch {batch} | {launch} | {_bench(run):.0f} |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 4, 8, 16, 32], help="split-K variants to time")
    parser.add_argument(
        "--kv-quant", type=int, nargs="+", default=[0], choices=[0, 4, 8], help="decode with these KV cache policies"
    )
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--tune", action="store_true", help="also time launch shapes of prefill and sampling")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_times.py needs a CUDA GPU")
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tables = [
        (
            "Decode attention, Llama-3-8B shape, bf16",
            decode_table(args.batches, args.contexts, args.splits, quant_policies=args.kv_quant),
        )
    ]
    if not args.skip_prefill:
        tables.append(("Prefill attention (causal), Llama-3-8B shape, bf16", prefill_table()))
    if not args.skip_sampling:
        tables.append(("Sampling, vocab 128256, float32 logits", sampling_table()))
    if args.tune:
        tables.append(("Launch shapes", tuning_table()))
    for title, lines in tables:
        print(f"\n{title}\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
