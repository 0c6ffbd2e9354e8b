"""Step profile, step b of bench/gpu_report.sh: where a decode step's time goes, with the bytes floor beside each.

- ms per decode step (one CUDA-graph replay on a GPU, the eager step elsewhere) at batch buckets 1/8/32/128/256,
  every row near position 250 (the positions are reset before each bucket), beside the floor: the decoder's weights
  plus the KV cache the step reads, at the copy bandwidth measured in the same run; on the triton backend once per
  linear backend (the fused batch-invariant projections, then the torch ones: the graphs are captured again), the
  comparison that picks EngineConfig.linear_backend's default;
- the kernels of one step by category (torch.profiler, the eager step at bucket 8: what the graph holds);
- T5 ms per prompt (batches of 1 and 32) and EnCodec ms per 10 s clip (batches of 1 and 8), beside their weights'
  floor (both are compute-bound: the floor only says how far from memory-bound they are).

The JSON is rewritten as each part finishes. Random weights (bench/common.checkpoint); no soundfile/soxr.

    python bench/step_profile.py --device cuda --model small --out profile.json
    python bench/step_profile.py --device cpu --model tiny --dry-run --out profile.json
    TRITON_INTERPRET=1 python bench/step_profile.py --device cpu --model tiny --dry-run --backend triton --out p.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, atomic_write_text, checkpoint, copy_bandwidth, machine_name  # noqa: E402

import fastgen  # noqa: E402
from fastgen.model.musicgen import normalize_device  # noqa: E402

CATEGORIES = [("attention", r"decode_attention|attention|sdpa|softmax"), ("sampling", r"sampl|topk|sort|gumbel"),
              ("embedding", r"embedding"), ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|\bmm\b|addmm|linear|matmul"),
              ("layernorm", r"layer_norm|layernorm"),
              ("copy/index", r"copy|index|gather|scatter|cat\b|fill|zero|clone|memcpy|memset")]


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "elementwise/other"


def timer(device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def measure(fn, repeats: int) -> float:
        """Mean seconds per call over ``repeats`` calls, after one untimed call."""
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats
    return measure


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU)")
    parser.add_argument("--backend", default="auto", help="EngineConfig.backend (triton: both linear backends)")
    args = parser.parse_args()
    device = normalize_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    buckets = [1, 2] if args.dry_run else [1, 8, 32, 128, 256]
    position = 12 if args.dry_run else 250
    repeats = 3 if args.dry_run else 20
    clip_s = 1.0 if args.dry_run else 10.0
    measure = timer(device)
    result: dict = {"machine": machine_name(str(device)), "device": str(device), "dtype": dtype_name,
                    "model": args.model, "torch": torch.__version__}

    def save(part: str) -> None:
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"[{part}] saved", flush=True)

    bandwidth = copy_bandwidth(str(device))
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    folder = checkpoint(args.model, dtype_name)
    # slots sized for the position reached plus the timed steps; one request per slot of the largest bucket
    frames = position + repeats + 24  # every bucket starts again from the same positions
    start = time.perf_counter()
    engine = fastgen.Engine.from_pretrained(folder, device=device, dtype=dtype, max_slots=max(buckets),
                                            max_duration_s=frames / 50, backend=args.backend)
    result["engine_start_s"] = time.perf_counter() - start  # load + CUDA-graph capture of every bucket
    runner, decoder = engine.runner, engine.model.decoder
    result["mode"] = "graph-replay" if runner.graphs is not None else f"eager-{engine.ops.name}"
    params = fastgen.SamplingParams(max_new_tokens=frames - 8, seed=0, guidance_scale=3.0, top_k=250)
    requests = [engine.add_request(PROMPTS[i % len(PROMPTS)], params) for i in range(max(buckets))]
    while min(r.position for r in requests) < position:  # the whole batch steps to the position first
        engine.step()
    snapshot = runner.state.position.clone()
    weights = decoder.step_weight_bytes()  # what a step streams, at the stored width
    config = decoder.config
    element = torch.finfo(dtype).bits // 8
    text_tokens = max(len(r.text_ids) for r in requests)
    result["decoder_weight_bytes"] = weights
    result["steps"] = []
    # the engine's own linear backend first; on the triton backend then the other one, on graphs captured again
    linear_backends = [decoder.linear_backend]
    if engine.ops.name == "triton":
        linear_backends.append("torch" if decoder.linear_backend == "triton" else "triton")
    for linear_backend in linear_backends:
        if linear_backend != decoder.linear_backend:
            try:  # a failure here must not cost the parts after it (kernels, T5, EnCodec)
                decoder.set_linear_backend(linear_backend)
                if runner.graphs is not None:
                    runner.capture_graphs()
            except (RuntimeError, ValueError) as error:
                result.setdefault("linear_backend_errors", {})[linear_backend] = repr(error)
                print(f"{linear_backend} linears: not profiled: {error!r}", flush=True)
                break
        for bucket in buckets:
            batch = requests[:bucket]
            runner.state.position.copy_(snapshot)
            plan = runner.plan(batch)
            seconds = measure(lambda: runner.step(plan, batch), repeats)
            # per step: weights once, then K and V of both CFG rows over the filled cache (self) and the text (cross)
            kv = 2 * 2 * bucket * config.num_layers * config.hidden_size * element * (position + text_tokens)
            logits = 2 * bucket * config.num_codebooks * config.vocab_size * 4
            floor_ms = (weights + kv + logits) / bandwidth * 1e3
            result["steps"].append({"bucket": bucket, "linear_backend": linear_backend, "position": position,
                                    "ms_per_step": seconds * 1e3, "floor_ms": floor_ms,
                                    "bytes": weights + kv + logits})
            print(f"bucket {bucket:>3} ({linear_backend} linears): {seconds * 1e3:.3f} ms per step "
                  f"(floor {floor_ms:.3f} ms)", flush=True)
        runner.state.position.copy_(snapshot)
        save(f"steps ({linear_backend} linears)")
    result["linear_backend_profiled"] = decoder.linear_backend  # the kernel profile below runs on this one

    # the kernels of one eager step (what a graph replays), by category
    batch = requests[:min(8, max(buckets))]
    plan = runner.plan(batch)
    kv_span, text_span = runner.kv_span(batch), max(plan.text_span, 1)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        runner.decode_step(plan.slot_ids, plan.hints, kv_span, text_span)
        with profile(activities=activities) as prof:
            runner.decode_step(plan.slot_ids, plan.hints, kv_span, text_span)
            if device.type == "cuda":
                torch.cuda.synchronize()
    by_category: dict[str, dict] = defaultdict(lambda: {"count": 0, "us": 0.0})
    for event in prof.events():
        on_device = getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
        if device.type == "cuda" and not on_device:
            continue
        if device.type != "cuda" and (event.cpu_parent is not None or not event.name.startswith("aten::")):
            continue  # CPU: top-level aten operators only
        entry = by_category[category(event.name)]
        entry["count"] += 1
        entry["us"] += event.time_range.elapsed_us()
    runner.state.position.copy_(snapshot)
    result["kernels"] = {"bucket": len(batch), "what": "CUDA kernels" if device.type == "cuda" else "aten ops",
                         "by_category": dict(by_category),
                         "total": sum(v["count"] for v in by_category.values())}
    save("kernels")

    # T5 per prompt, EnCodec per clip
    ids = [r.text_ids for r in requests[:1]], [requests[i % len(requests)].text_ids for i in range(32)]
    t5 = tensor_bytes(engine.model.text_encoder.model.parameters())
    per_prompt = {len(batch_ids): measure(lambda: runner.encode_text(batch_ids), 3) / len(batch_ids)
                  for batch_ids in ids}
    result["t5"] = {"ms": per_prompt[32] * 1e3, "per": "per prompt (batch of 32)",
                    "ms_batch1": per_prompt[1] * 1e3, "floor_ms": t5 / 32 / bandwidth * 1e3, "weight_bytes": t5}
    save("t5")
    clip_frames = int(clip_s * 50)
    vocab = config.vocab_size
    codes = [torch.randint(0, vocab, (config.num_codebooks, clip_frames)) for _ in range(8)]
    encodec = tensor_bytes(engine.model.codec.model.parameters())
    one = measure(lambda: runner.decode_audio(codes[:1]), 2)
    eight = measure(lambda: runner.decode_audio(codes), 1) / 8
    result["encodec"] = {"ms": one * 1e3, "per": f"per {clip_s:g} s clip (batch of 1)", "ms_per_clip_batch8":
                         eight * 1e3, "floor_ms": encodec / bandwidth * 1e3, "weight_bytes": encodec}
    save("encodec")
    engine.close()


if __name__ == "__main__":
    main()
