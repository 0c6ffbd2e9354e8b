"""Throughput: N requests through fastgen's continuous batching vs transformers' generate in static batches, on the
same checkpoint. Reports seconds of audio per wall second, p50/p95 latency, time to first step and peak memory.

On a CPU both systems get the same intra-op threads (--threads, default all torch sees): fastgen's AsyncEngine decodes
on its loop thread with cpu_threads=N (its own default is 1, for a server), transformers in the worker with N.

Arrivals are either all at once (--arrival batch) or a Poisson process (--arrival poisson --rate R per second).
transformers runs the requests in arrival order in static batches of each size in --tf-batches (a batch starts when
its last member has arrived and the previous batch is done); the best batch size is reported beside fastgen.

    python bench/throughput.py                       # tiny model, CPU
    python bench/throughput.py --model small --device cuda --requests 256 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (PROMPTS, add_variant_arguments, append_json_line, checkpoint, fastgen_options,  # noqa: E402
                    fastgen_systems, machine_name, peak_memory, write_result)

FRAME_RATE = 50


def arrivals(args: argparse.Namespace) -> list[float]:
    if args.arrival == "batch":
        return [0.0] * args.requests
    gaps = np.random.default_rng(0).exponential(1.0 / args.rate, size=args.requests)
    return list(np.cumsum(gaps) - gaps[0])


def summarize(latency: list[float], first_step: list[float], wall: float, audio_s: float, peak: int) -> dict:
    return {"wall_s": wall, "audio_s_per_s": audio_s / wall, "p50_latency_s": float(np.percentile(latency, 50)),
            "p95_latency_s": float(np.percentile(latency, 95)),
            "p50_first_step_s": float(np.percentile(first_step, 50)), "peak_bytes": peak}


# ------------------------------------------------------------------------------------------------------------ workers
def run_fastgen(args, folder, times, system: str) -> dict:
    import torch

    import fastgen
    engine = fastgen.AsyncEngine.from_pretrained(folder, device=args.device, dtype=getattr(torch, args.dtype),
                                                 max_duration_s=args.seconds, max_slots=args.slots or None,
                                                 cpu_threads=args.threads, **fastgen_options(system))
    params = [fastgen.SamplingParams(duration=args.seconds, seed=i, guidance_scale=3.0, top_k=250)
              for i in range(args.requests)]
    warm = engine.submit(PROMPTS[0], fastgen.SamplingParams(max_new_tokens=8, seed=0))
    warm.result()
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    handles, submitted = [], []
    start = time.perf_counter()

    def feeder():
        for i, at in enumerate(times):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submitted.append(time.perf_counter())
            handles.append(engine.submit(PROMPTS[i % len(PROMPTS)], params[i]))

    thread = threading.Thread(target=feeder)
    thread.start()
    thread.join()
    outputs = [h.result() for h in handles]
    wall = time.perf_counter() - start
    engine.shutdown_sync()
    latency = [o.timings["total_s"] for o in outputs]
    first_step = [o.timings["queue_s"] for o in outputs]
    audio_s = sum(o.duration for o in outputs)
    return {"system": system, "slots": engine.engine.num_slots,
            **summarize(latency, first_step, wall, audio_s, peak_memory(args.device))}


def decode_in_batches(decode, device):
    """transformers' generate hands EnCodec the whole batch's codes in one call, whose activations grow with clips x
    samples (a 10 s clip in bf16 grows a CPU process by about 0.35 GB: 256 at once would not fit an 80 GB GPU). Decode
    as many clips per call as fastgen does, so both pay the codec alike."""
    import torch
    from transformers.models.encodec.modeling_encodec import EncodecDecoderOutput

    from fastgen.model.codec import CPU_DECODE_BATCH, DECODE_BATCH
    clips = CPU_DECODE_BATCH if device.type == "cpu" else DECODE_BATCH

    def decode_batches(audio_codes, audio_scales, *args, **kwargs):  # codes: [chunks, batch, codebooks, frames]
        parts = []
        for first in range(0, audio_codes.shape[1], clips):
            rows = slice(first, first + clips)
            scales = [None if s is None else s[rows] for s in audio_scales]  # per-clip scales (None for MusicGen)
            parts.append(decode(audio_codes[:, rows], scales, *args, **kwargs).audio_values)
        return EncodecDecoderOutput(audio_values=torch.cat(parts))
    return decode_batches


def run_transformers(args, folder, times, batch: int) -> dict:
    import torch
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)  # the same intra-op threads as fastgen's engine gets
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    new_tokens = round(args.seconds * FRAME_RATE) + 3  # same frames as fastgen's duration (the delay eats 3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.audio_encoder.decode = decode_in_batches(model.audio_encoder.decode, device)

    def generate(prompts, tokens=new_tokens):
        inputs = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=True, guidance_scale=3.0, top_k=250, max_new_tokens=tokens)
        sync()
        return out

    generate(PROMPTS[:1], tokens=8)  # warm-up: every kernel and the codec once, as fastgen's warm-up (not a clip)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    latency, first_step = [], []
    audio_s = 0.0
    start = time.perf_counter()
    clock = 0.0
    for first in range(0, len(times), batch):
        members = list(range(first, min(first + batch, len(times))))
        begin = max(clock, times[members[-1]])
        if begin > clock:
            time.sleep(max(0.0, start + begin - time.perf_counter()))
        t0 = time.perf_counter() - start
        audio = generate([PROMPTS[i % len(PROMPTS)] for i in members])
        clock = time.perf_counter() - start
        audio_s += audio.shape[0] * audio.shape[-1] / model.config.audio_encoder.sampling_rate
        latency += [clock - times[i] for i in members]
        first_step += [t0 - times[i] for i in members]
    wall = time.perf_counter() - start
    return {"system": f"transformers(batch={batch})", "batch": batch,
            **summarize(latency, first_step, wall, audio_s, peak_memory(args.device))}


# ------------------------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny/small/medium/large or a checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=None, help="default: 64 on a GPU, 24 on a CPU")
    parser.add_argument("--seconds", type=float, default=None, help="audio per request (default 10 GPU, 2 CPU)")
    parser.add_argument("--arrival", choices=["batch", "poisson"], default="batch")
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--slots", type=int, default=0, help="fastgen slots (0: from the memory budget)")
    parser.add_argument("--tf-batches", default=None, help="comma list (default: 1,8,32,64 GPU; 1,8 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads of each system (default: torch's count here, every core)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append one JSON line per system as it finishes (a timeout keeps finished rows)")
    add_variant_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.requests = args.requests or (64 if gpu else 24)
    args.seconds = args.seconds or (10.0 if gpu else 2.0)
    args.tf_batches = args.tf_batches or ("1,8,32,64" if gpu else "1,8")
    if args.threads is None:
        import torch
        args.threads = torch.get_num_threads()
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    folder = checkpoint(args.model, args.dtype)
    times = arrivals(args)
    if args.worker:
        result = (run_fastgen(args, folder, times, args.worker)
                  if args.worker.startswith("fastgen") else run_transformers(args, folder, times, int(args.worker)))
        print(json.dumps(result))
        return

    import torch
    if gpu and not torch.cuda.is_available():
        print("bench/throughput.py: --device cuda given but no GPU is available")
        return
    rows = []
    ours = fastgen_systems(args.compile, args.steps_per_call)
    machine = machine_name(args.device)
    for worker in ours + args.tf_batches.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--threads", str(args.threads), "--worker", worker]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{worker} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        append_json_line(args.jsonl, {"model": args.model, "machine": machine, "device": args.device,
                                      "dtype": args.dtype, "threads": args.threads, "requests": args.requests, "seconds": args.seconds,
                                      "arrival": args.arrival, **rows[-1]})
        print(f"{rows[-1]['system']}: {rows[-1]['audio_s_per_s']:.2f} audio s/s", flush=True)
    print(f"\n{args.requests} requests × {args.seconds} s, {args.arrival} arrivals"
          f"{f' at {args.rate}/s' if args.arrival == 'poisson' else ''}; model {args.model}, {args.device} "
          f"{args.dtype}, {args.threads} intra-op threads each; {machine}")
    print(f"{'system':<24}{'audio s/s':>10}{'p50 lat s':>11}{'p95 lat s':>11}{'1st step s':>11}{'peak MB':>9}")
    for r in rows:
        print(f"{r['system']:<24}{r['audio_s_per_s']:>10.2f}{r['p50_latency_s']:>11.2f}{r['p95_latency_s']:>11.2f}"
              f"{r['p50_first_step_s']:>11.2f}{r['peak_bytes'] / 2**20:>9.0f}")
    theirs = [r for r in rows if not r["system"].startswith("fastgen")]
    summary = {}
    for mine in (r for r in rows if r["system"].startswith("fastgen")):
        if not theirs:
            break
        best = max(theirs, key=lambda r: r["audio_s_per_s"])
        single = next((r for r in theirs if r.get("batch") == 1), None)
        entry = {"vs_best_static": mine["audio_s_per_s"] / best["audio_s_per_s"], "best_static": best["system"]}
        if single:
            entry["vs_batch1"] = mine["audio_s_per_s"] / single["audio_s_per_s"]
        summary[mine["system"]] = entry
        print(f"{mine['system']} throughput: {entry['vs_best_static']:.2f}× {best['system']}"
              + (f", {entry['vs_batch1']:.2f}× transformers(batch=1)" if single else ""))
    if args.out or not args.jsonl:  # (with --jsonl alone the lines are the result: nothing lands in bench/results/)
        write_result("throughput", args.device, machine, args.out, {
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "jsonl")}, "rows": rows,
            "summary": summary})

if __name__ == "__main__":
    main()
