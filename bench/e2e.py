"""End to end: fastgen vs transformers' MusicgenForConditionalGeneration.generate on the same checkpoint and prompts.

Reports, side by side and as a ratio: the decode step time (from the difference between two generation lengths, so
T5 and set-up cancel out, less the difference in EnCodec time, which both systems spend in the same transformers
EncodecModel and which grows with the length), total time for one clip, seconds of audio per second, and peak memory, with the
bytes-per-step floor (decoder weights streamed once per step) beside them. Each system runs in its own subprocess so
peak memory is its own.

    python bench/e2e.py                                  # tiny + musicgen-small (random weights), CPU fp32
    python bench/e2e.py --models tiny --compile           # adds fastgen with compile_step=True
    python bench/e2e.py --steps-per-call 4                # adds fastgen with 4 decode steps per call
    python bench/e2e.py --models small --device cuda --dtype bfloat16
    python bench/e2e.py --models small --device cuda --systems fastgen,transformers --jsonl e2e.jsonl
                                                          # a JSON line per system as it finishes (gpu_report.sh)
    python bench/e2e.py --models small --dtype float32,bfloat16 --quantize int8 --threads 1   # CPU table
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (PROMPTS, add_variant_arguments, append_json_line, checkpoint, copy_bandwidth,  # noqa: E402
                    fastgen_options, fastgen_systems, machine_name, peak_memory, timed, write_result)

# ------------------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> dict:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    codec_seconds = [0.0]

    def timing_codec(decode):
        def wrapper(*a, **kw):
            sync()
            start = time.perf_counter()
            out = decode(*a, **kw)
            sync()
            codec_seconds[0] += time.perf_counter() - start
            return out
        return wrapper
    if args.worker.startswith("fastgen"):
        import fastgen
        model = fastgen.MusicGen.from_pretrained(args.model_dir, device=device, dtype=dtype,
                                                 max_slots=max(args.batch, 1), max_duration_s=args.max_duration,
                                                 **fastgen_options(args.worker))
        codec = model.engine.runner.codec
        codec.decode = timing_codec(codec.decode)

        def generate(steps: int) -> float:
            params = fastgen.SamplingParams(max_new_tokens=steps, guidance_scale=3.0, top_k=250, do_sample=True,
                                            seed=0)
            return timed(lambda: model.generate([PROMPTS[0]] * args.batch, params), sync)
        decoder = model.engine.model.decoder
        decoder_bytes = decoder.step_weight_bytes()  # what a step streams, at the stored width (int8: 1 byte)
        from fastgen.model.cpu_paths import chosen_paths
        linear_paths = sorted({f"{str(k[0]).removeprefix('torch.')} {k[1][0]}x{k[1][1]}: {v}"
                               for k, v in chosen_paths().items()})
    else:
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration
        model = MusicgenForConditionalGeneration.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model.audio_encoder.decode = timing_codec(model.audio_encoder.decode)
        inputs = tokenizer([PROMPTS[0]] * args.batch, return_tensors="pt").to(device)

        def generate(steps: int) -> float:
            torch.manual_seed(0)
            with torch.inference_mode():
                return timed(lambda: model.generate(**inputs, max_new_tokens=steps, guidance_scale=3.0, top_k=250,
                                                     do_sample=True), sync)
        decoder_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if n.startswith(("decoder.", "enc_to_dec_proj")))
        linear_paths = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generate(2 * args.steps)  # warm-up
    short, long = args.steps, 2 * args.steps

    def best(steps: int) -> tuple[float, float]:
        """Fastest of the repeats: (total seconds, seconds outside EnCodec)."""
        runs = []
        for _ in range(args.repeats):
            codec_seconds[0] = 0.0
            total = generate(steps)
            runs.append((total, total - codec_seconds[0]))
        return min(r[0] for r in runs), min(r[1] for r in runs)
    (_, net_short), (t_long, net_long) = best(short), best(long)
    step_s = (net_long - net_short) / (long - short)
    frame_rate = 50
    audio_s = (long + 1 - 4) / frame_rate * args.batch
    peak = peak_memory(device)
    return {"system": args.worker, "step_ms": step_s * 1e3, "total_s": t_long,
            "steps": long, "audio_s_per_s": audio_s / t_long, "peak_bytes": peak, "decoder_bytes": decoder_bytes,
            "dtype": args.dtype, "threads": torch.get_num_threads(), "linear_paths": linear_paths}


# ------------------------------------------------------------------------------------------------------------ driver
def run_worker(args: argparse.Namespace, system: str, model_dir: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model-dir", str(model_dir), "--device", args.device,
           "--dtype", dtype, "--steps", str(args.steps), "--repeats", str(args.repeats), "--batch",
           str(args.batch), "--threads", str(args.threads), "--max-duration", str(args.max_duration)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, name: str, folder: Path, dtype: str, systems: list[str], bandwidth: float,
            machine: str) -> dict:
    """Every system asked for (transformers and fastgen variants) on one model in one dtype, each beside its floor;
    with --jsonl, a JSON line per system as it finishes (a later timeout keeps the rows before it)."""
    row = {"model": name, "dtype": dtype}
    for system in systems:
        try:
            row[system] = run_worker(args, system, folder, dtype)
        except RuntimeError as exc:  # one system failing must not cost the report its other rows
            print(exc, file=sys.stderr)
            row["failed"] = row.get("failed", []) + [system]
            continue
        # the floor streams the system's own step weights once (int8: one byte each) at the copy bandwidth
        result = row[system]
        result["floor_ms"] = result["decoder_bytes"] / bandwidth * 1e3
        result["floor_ratio"] = result["step_ms"] / result["floor_ms"]
        append_json_line(args.jsonl, {"model": name, "machine": machine, "device": args.device, "batch": args.batch,
                                      **result, "floor_step_ms": result["floor_ms"]})
    for system in systems:
        if system != "transformers" and system in row and "transformers" in row:
            row[f"{system}_step_speedup"] = row["transformers"]["step_ms"] / row[system]["step_ms"]
            row[f"{system}_total_speedup"] = row["transformers"]["total_s"] / row[system]["total_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small", help="comma list of tiny/small/medium/large or folders")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="comma list (each a row group beside transformers in that "
                        "dtype); default: fastgen's default for the device (bf16 on cuda and native-bf16 CPUs)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps of the shorter run (the longer: 2×)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--max-duration", type=float, default=10.0, help="fastgen slot size in seconds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--systems", default=None,
                        help="comma list of the systems to run, in this order (default: transformers, then every "
                             "fastgen variant asked for)")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append one JSON line per system as it finishes (a timeout keeps finished rows)")
    add_variant_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        from fastgen.model.musicgen import parse_dtype
        import torch
        args.dtype = str(parse_dtype(None, torch.device(args.device))).removeprefix("torch.")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/e2e.py: --device cuda given but no GPU is available")
        return
    machine = machine_name(args.device)
    bandwidth = copy_bandwidth(args.device)
    ours = fastgen_systems(args.compile, args.steps_per_call, args.quantize)
    systems = args.systems.split(",") if args.systems else ["transformers"] + ours
    dtypes = args.dtype.split(",")
    rows = []
    for name in args.models.split(","):
        folder = checkpoint(name, dtypes[0])  # one checkpoint: every dtype loads (casts) from the same weights
        rows += [measure(args, name, folder, dtype, systems, bandwidth, machine) for dtype in dtypes]
    print(f"\nmachine: {machine}; device {args.device}, batch {args.batch}, threads {args.threads or 'default'}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; torch {torch.__version__}")
    header = (f"{'model':<8}{'dtype':<10}{'system':<18}{'step ms':>9}{'floor ms':>10}{'× floor':>8}{'total s':>9}"
              f"{'audio s/s':>11}{'peak MB':>9}{'step ×':>8}{'total ×':>9}")
    print(header)
    for row in rows:
        for system in [name for name in systems if name in row]:
            r = row[system]
            ratio = (f"{row[f'{system}_step_speedup']:>8.2f}{row[f'{system}_total_speedup']:>9.2f}"
                     if f"{system}_step_speedup" in row else "")
            print(f"{row['model']:<8}{row['dtype']:<10}{system:<18}{r['step_ms']:>9.2f}{r['floor_ms']:>10.2f}"
                  f"{r['floor_ratio']:>8.2f}{r['total_s']:>9.2f}{r['audio_s_per_s']:>11.2f}"
                  f"{r['peak_bytes'] / 2**20:>9.0f}{ratio}")
    if args.out or not args.jsonl:  # (with --jsonl alone the lines are the result: nothing lands in bench/results/)
        write_result("e2e", args.device, machine, args.out, {
            "device": args.device, "dtypes": dtypes, "batch": args.batch, "threads": args.threads,
            "copy_bandwidth_Bps": bandwidth, "rows": rows})

if __name__ == "__main__":
    main()
