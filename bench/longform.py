"""Long-form overhead: seconds of audio per wall second of one long request (sliding windows, re-prefilled in place
at each window end) against requests one window long, on the same engine and checkpoint, batch 1, CFG 3, top-k 250.

Every window after the first decodes `stride` new frames (plus the delay pattern's tail) after re-prefilling the
`window − stride` kept ones, so the overhead is the re-prefill (timed on its own here) and that tail; the floor is a
ratio of 1.0 (a long request as fast per audio second as a window-long one).

    python bench/longform.py --device cuda                  # musicgen-small random weights: 120 s vs 30 s requests
    python bench/longform.py --device cpu --window 5 --stride 3 --long 20   # the same six windows, scaled down 6×
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, machine_name, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="tiny, small, medium, large (random weights) or a folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--window", type=float, default=30.0, help="window_s (seconds; the trained 30 s)")
    parser.add_argument("--stride", type=float, default=18.0, help="extend_stride (seconds)")
    parser.add_argument("--long", type=float, default=120.0, help="the long request's duration (seconds)")
    parser.add_argument("--short-requests", type=int, default=1, help="window-long requests run one after another")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    import fastgen
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    folder = checkpoint(args.model, dtype)
    engine = fastgen.Engine.from_pretrained(folder, device=args.device, dtype=getattr(torch, dtype), max_slots=1,
                                            window_s=args.window, max_duration_s=max(args.long, args.window))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    reprefill_s = []
    plain_reprefill = engine.runner.reprefill

    def timed_reprefill(request):  # the re-prefill alone, synchronised on both sides
        sync()
        start = time.perf_counter()
        plain_reprefill(request)
        sync()
        reprefill_s.append(time.perf_counter() - start)

    engine.runner.reprefill = timed_reprefill

    def run(duration: float, seed: int) -> float:
        params = fastgen.SamplingParams(duration=duration, extend_stride=args.stride, guidance_scale=3.0, top_k=250,
                                        seed=seed)
        request = engine.make_request(PROMPTS[seed % len(PROMPTS)], params)
        sync()
        start = time.perf_counter()
        engine.run([request])
        sync()
        assert request.output is not None, request.error
        return time.perf_counter() - start

    run(min(1.0, args.window), 0)  # warm-up: allocator, kernels, EnCodec
    short_wall = sum(run(args.window, 1 + i) for i in range(args.short_requests))
    short_audio = args.window * args.short_requests
    reprefill_s.clear()
    long_wall = run(args.long, 100)
    windows = len(reprefill_s) + 1
    result = {
        "model": args.model, "device": args.device, "dtype": dtype, "window_s": args.window,
        "extend_stride_s": args.stride, "long_s": args.long, "windows": windows,
        "short_audio_s_per_s": short_audio / short_wall, "long_audio_s_per_s": args.long / long_wall,
        "long_vs_short": (args.long / long_wall) / (short_audio / short_wall), "floor": 1.0,
        "reprefill_s_each": sum(reprefill_s) / max(len(reprefill_s), 1), "reprefill_share": sum(reprefill_s) / long_wall,
        "short_wall_s": short_wall, "long_wall_s": long_wall,
    }
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    write_result("longform", args.device, machine_name(args.device), args.out, result)


if __name__ == "__main__":
    main()
