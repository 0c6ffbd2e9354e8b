"""Kernel benchmarks: each Triton kernel against its eager PyTorch reference at MusicGen shapes.

    python bench/kernel_bench.py [--quick] [--out bench/results/kernels-<gpu>.json]
                            [--only embedding,attention,sampling,fused]

"fused": each fused projection (kernels/fused_linear.py) against what the torch linear backend runs for it: cuBLAS
(F.linear; torch.mm with fp32 output for the LM heads) plus the separate LayerNorm / GELU / residual add, at batch
(requests) 1, 8, 64, 256, i.e. M = 2·batch rows.

Times are medians of `triton.testing.do_bench` (spread: 20th-80th percentile). Achieved bandwidth counts the bytes
each kernel must move (its floor) and is compared with a large device-to-device copy measured in the same run.
Needs a CUDA GPU; without one it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

MODELS = {"small": (1024, 16), "medium": (1536, 24), "large": (2048, 32)}  # hidden width, heads (Dh = 64)
HEAD_DIM = 64
VOCAB = 2048
MAX_POSITIONS = 2048
QUANTILES = [0.5, 0.2, 0.8]
DEVICE = "cuda"


def bench(fn) -> tuple[float, float, float]:
    import triton.testing

    median, low, high = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=QUANTILES)
    return median, low, high


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    median, _, _ = bench(lambda: target.copy_(source))
    return 2 * source.numel() / (median * 1e-3) / 1e9


def row(kernel, model, shape, nbytes, ref_fn, triton_fn, check, peak) -> dict:
    try:
        ref = bench(ref_fn)
    except torch.OutOfMemoryError:
        ref = (float("nan"),) * 3
        torch.cuda.empty_cache()
    fast = bench(triton_fn)
    gbps = nbytes / (fast[0] * 1e-3) / 1e9
    return {"kernel": kernel, "model": model, **shape, "bytes": nbytes, "ref_ms": ref[0], "triton_ms": fast[0],
            "triton_p20_ms": fast[1], "triton_p80_ms": fast[2], "ref_p20_ms": ref[1], "ref_p80_ms": ref[2],
            "speedup": ref[0] / fast[0], "GBps": gbps, "pct_copy_bw": 100 * gbps / peak, "check": check()}


# ----------------------------------------------------------------------------------------------------- kernels
def bench_embedding(batches, dtype, peak):
    from fastgen.kernels.codebook_embedding import codebook_embedding, codebook_embedding_ref

    rows = []
    for model, (dim, _) in MODELS.items():
        for codebooks in (4, 8):
            tables = torch.randn(codebooks, VOCAB + 1, dim, device=DEVICE).to(dtype)
            sinusoid = torch.randn(MAX_POSITIONS, dim, device=DEVICE).to(dtype)
            for batch in batches:
                tokens = torch.randint(0, VOCAB + 1, (batch, codebooks), device=DEVICE)
                position = torch.randint(0, MAX_POSITIONS, (batch,), device=DEVICE, dtype=torch.int32)
                slots = torch.randperm(batch, device=DEVICE)
                out, want = (torch.empty(2 * batch, dim, device=DEVICE, dtype=dtype) for _ in range(2))
                args = (tokens, position, slots, tables, sinusoid)
                nbytes = batch * (codebooks + 1) * dim * tables.element_size() + out.numel() * out.element_size()

                def check():
                    codebook_embedding(*args, out)
                    codebook_embedding_ref(*args, want)
                    return {"max_abs_err": (out.float() - want.float()).abs().max().item()}

                rows.append(row("embedding", model, {"K": codebooks, "B": batch}, nbytes,
                                lambda: codebook_embedding_ref(*args, want), lambda: codebook_embedding(*args, out),
                                check, peak))
                print_row(rows[-1])
    return rows


def bench_attention(batches, lengths, dtype, peak):
    from fastgen.kernels.decode_attention import (decode_attention, decode_attention_append,
                                                  decode_attention_append_ref, decode_attention_ref)

    rows = []
    max_len = max(lengths)
    for model, (dim, heads) in MODELS.items():
        for batch in batches:
            query_rows = 2 * batch  # cond and uncond rows under CFG
            k_cache = torch.randn(query_rows, heads, max_len, HEAD_DIM, device=DEVICE).to(dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(query_rows, heads, HEAD_DIM, device=DEVICE).to(dtype)
            cache_row = torch.randperm(query_rows, device=DEVICE)
            out = torch.empty_like(q)
            for length in lengths:
                lengths_t = torch.full((query_rows,), length, device=DEVICE, dtype=torch.int32)
                args = (q, k_cache, v_cache, cache_row, lengths_t, HEAD_DIM ** -0.5)
                nbytes = 2 * query_rows * heads * length * HEAD_DIM * k_cache.element_size() + 2 * q.numel() * 2

                def check():
                    decode_attention(*args, out=out, max_length=length)
                    want = decode_attention_ref(*args, max_length=length)
                    return {"max_abs_err": (out.float() - want.float()).abs().max().item()}

                rows.append(row("attention", model, {"B": batch, "rows": query_rows, "L": length}, nbytes,
                                lambda: decode_attention_ref(*args, max_length=length),
                                lambda: decode_attention(*args, out=out, max_length=length), check, peak))
                print_row(rows[-1])

                # self-attention step with the new key/value appended at length - 1 (vs index_put + reference)
                k_new, v_new = torch.randn_like(q), torch.randn_like(q)
                append_args = (q, k_new, v_new, k_cache, v_cache, cache_row, lengths_t, HEAD_DIM ** -0.5)

                def check_append():
                    decode_attention_append(*append_args, out=out, max_length=length)
                    want = decode_attention_append_ref(*append_args, max_length=length)
                    return {"max_abs_err": (out.float() - want.float()).abs().max().item()}

                rows.append(row("attn+kv", model, {"B": batch, "rows": query_rows, "L": length}, nbytes,
                                lambda: decode_attention_append_ref(*append_args, max_length=length),
                                lambda: decode_attention_append(*append_args, out=out, max_length=length),
                                check_append, peak))
                print_row(rows[-1])
            del k_cache, v_cache
            torch.cuda.empty_cache()
    return rows


def bench_sampling(batches, logit_dtype, peak):
    from fastgen.kernels.sampling import sample_next_tokens
    from fastgen.kernels.sampling_ref import sample_next_tokens_ref

    rows = []
    for codebooks, channels in ((4, 1), (8, 2)):
        for top_k, top_p in ((250, 1.0), (250, 0.9), (0, 1.0)):
            for batch in batches:
                logits = (torch.randn(2 * batch, codebooks, VOCAB, device=DEVICE) * 3).to(logit_dtype)

                def per_slot(value, dtype):
                    return torch.full((batch,), value, device=DEVICE, dtype=dtype)

                state = [per_slot(3.0, torch.float32), per_slot(1.0, torch.float32), per_slot(top_k, torch.int32),
                         per_slot(top_p, torch.float32), torch.arange(batch, device=DEVICE) * 7 + 1,
                         per_slot(100, torch.int32), per_slot(1500, torch.int32), per_slot(0, torch.int32)]
                slots = torch.randperm(batch, device=DEVICE)

                def buffers():
                    return (torch.zeros(batch, codebooks, dtype=torch.int64, device=DEVICE),
                            torch.zeros(batch, codebooks, 1500, dtype=torch.int64, device=DEVICE),
                            torch.zeros(batch, dtype=torch.int32, device=DEVICE))

                mine, theirs = buffers(), buffers()
                args = (logits, slots, *state)
                nbytes = logits.numel() * logits.element_size()

                def check():
                    sample_next_tokens(*args, *mine, VOCAB, channels)
                    sample_next_tokens_ref(*args, *theirs, VOCAB, channels)
                    return {"tokens_equal": (mine[0] == theirs[0]).float().mean().item()}

                rows.append(row("sampling", f"K={codebooks}", {"K": codebooks, "B": batch, "top_k": top_k,
                                                               "top_p": top_p}, nbytes,
                                lambda: sample_next_tokens_ref(*args, *theirs, VOCAB, channels),
                                lambda: sample_next_tokens(*args, *mine, VOCAB, channels), check, peak))
                print_row(rows[-1])
    return rows


FFN = {"small": 4096, "medium": 6144, "large": 8192}
FUSED_BATCHES = [1, 8, 64, 256]


def bench_fused(models, batches, dtype, peak):
    import torch.nn.functional as F

    from fastgen.kernels.fused_linear import engine_projections, fused_linear, fused_linear_ref

    rows = []
    for model in models:
        dim = MODELS[model][0]
        for role, n, k, norm, activation, accumulate in engine_projections(dim, FFN[model]):
            weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
            ln = (torch.randn(k, device=DEVICE).to(dtype), torch.randn(k, device=DEVICE).to(dtype)) if norm else None
            out_dtype = torch.float32 if role == "heads" else dtype
            for batch in batches:
                m = 2 * batch
                x = torch.randn(m, k, device=DEVICE).to(dtype)
                hidden = torch.randn(m, n, device=DEVICE).to(out_dtype)
                out = torch.empty(m, n, device=DEVICE, dtype=out_dtype)
                kwargs = {"norm": ln, "activation": activation}

                def fused():
                    if accumulate:
                        return fused_linear(x, weight, out=hidden, accumulate=True, **kwargs)
                    return fused_linear(x, weight, out=out, **kwargs)

                def unfused():  # the torch linear backend's operators for this projection
                    y = F.layer_norm(x, (k,), *ln) if ln is not None else x
                    if role == "heads":
                        return torch.mm(y, weight.t(), out_dtype=torch.float32)
                    y = F.linear(y, weight)
                    if activation == "gelu":
                        y = F.gelu(y)
                    return hidden.add_(y) if accumulate else y

                def check():
                    start = hidden.clone()
                    got = fused_linear(x, weight, out=start.clone() if accumulate else None, accumulate=accumulate,
                                       out_dtype=out_dtype, **kwargs)
                    want = fused_linear_ref(x, weight, norm=ln, activation=activation, accumulate=accumulate,
                                            out=start.clone() if accumulate else None, out_dtype=out_dtype)
                    scale = want.float().abs().max().item() or 1.0
                    return {"max_rel_err": (got.float() - want.float()).abs().max().item() / scale}

                element = weight.element_size()
                nbytes = (n * k * element + m * k * element + m * n * out.element_size() * (2 if accumulate else 1)
                          + (2 * k * element if norm else 0))
                rows.append(row(f"fused-{role}", model, {"N": n, "K": k, "B": batch, "rows": m}, nbytes, unfused,
                                fused, check, peak))
                print_row(rows[-1])
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------- output
HEADER = (f"{'kernel':<15} {'model':<7} {'shape':<34} {'ref ms':>9} {'triton ms':>10} {'(p20-p80)':>17} "
          f"{'speedup':>8} {'GB/s':>8} {'%copy':>6}  check")


def print_row(r: dict) -> None:
    shape = " ".join(f"{k}={r[k]}" for k in ("N", "K", "B", "rows", "L", "top_k", "top_p") if k in r)
    spread = f"({r['triton_p20_ms']:.4f}-{r['triton_p80_ms']:.4f})"
    check = " ".join(f"{k}={v:.3g}" for k, v in r["check"].items())
    print(f"{r['kernel']:<15} {r['model']:<7} {shape:<34} {r['ref_ms']:>9.4f} {r['triton_ms']:>10.4f} {spread:>17} "
          f"{r['speedup']:>7.2f}x {r['GBps']:>8.1f} {r['pct_copy_bw']:>5.1f}%  {check}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (batches 1/16/256, lengths 64/1500; "
                        "fused projections: musicgen-small at batch 1 and 64)")
    parser.add_argument("--out", help="JSON path (default bench/results/kernels-<gpu-name>.json)")
    parser.add_argument("--only", default="embedding,attention,sampling,fused", help="comma-separated kernels to run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="activation / cache dtype")
    parser.add_argument("--logits-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_bench.py needs a CUDA GPU; none is available here, nothing measured.")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to benchmark compiled kernels")
        return 1
    import triton

    batches = [1, 16, 256] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    lengths = [64, 1500] if args.quick else [64, 256, 500, 1000, 1500]
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    peak = copy_bandwidth()
    print(f"{gpu}: copy bandwidth {peak:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}")
    print(HEADER)
    torch.manual_seed(0)
    rows = []
    only = set(args.only.split(","))
    if "embedding" in only:
        rows += bench_embedding(batches, dtype, peak)
    if "attention" in only:
        rows += bench_attention(batches, lengths, dtype, peak)
    if "sampling" in only:
        rows += bench_sampling(batches, getattr(torch, args.logits_dtype), peak)
    if "fused" in only:  # --quick: musicgen-small's shapes at batch 1 and 64 only
        rows += bench_fused(["small"] if args.quick else list(MODELS), [1, 64] if args.quick else FUSED_BATCHES,
                            dtype, peak)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels-{gpu.replace(' ', '-')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "copy_GBps": peak, "dtype": args.dtype,
            "logits_dtype": args.logits_dtype, "quick": args.quick}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
