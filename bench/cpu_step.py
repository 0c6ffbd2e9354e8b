"""The decode step at a given cache position, split into its projections and everything else, beside the floor.

One request (CFG: 2 rows) is admitted; the step is then timed at each position by setting the slot's position
counter (the cache's contents do not change the cost of reading it), so position 1500 costs no 1500-step
generation. "linears" is the same step's projections alone (every layer's, in order, at 2 rows, so weights stream
from DRAM as in the step); "rest" = step − linears is attention over the cache, layer norms, embedding, sampling
and the host loop. The floor streams the step's weights once plus the K/V the attention reads, at the copy
bandwidth measured in the same run. Medians of --repeats timings; each variant in its own subprocess.

    python bench/cpu_step.py --models small --dtype float32,bfloat16 --quantize int8,int8-dynamic,int4 --threads 1,2
    python bench/cpu_step.py --models small --dtype float32 --quantize int4 --threads 2 --compile
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, copy_bandwidth, machine_name, quantize_modes, write_result  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    import torch

    import fastgen
    from fastgen.model.linear import chosen_paths
    torch.set_num_threads(args.threads)
    engine = fastgen.Engine.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype), max_slots=1,
                                            backend="torch", quantization=args.quantize or None,
                                            compile_step=args.compile)
    runner, decoder = engine.runner, engine.model.decoder
    longest = engine.max_frames / engine.frame_rate  # the slot's full length: every position below is in range
    engine.add_request(PROMPTS[0], fastgen.SamplingParams(duration=longest, guidance_scale=3.0, top_k=250, seed=0))
    engine.step()  # admit and run the first step
    requests = list(engine.scheduler.running.values())
    plan = runner.plan(requests)
    slot = requests[0].slot
    d = decoder.config.hidden_size
    x = {width: torch.randn(2, width, dtype=decoder.dtype) for width in (d, decoder.config.ffn_dim)}
    # the LM heads run as the step runs them (head_logits: fp32 logits, the head kept in fp32 off CUDA)
    linears = [(decoder.head_logits if linear is decoder.lm_heads else linear,
                x[d] if i % 6 != 5 or linear is decoder.lm_heads else x[decoder.config.ffn_dim])
               for i, linear in enumerate(decoder.linears())]
    results = {}
    with torch.inference_mode():
        for position in [p for p in args.positions if p < runner.cache_positions]:
            kv_span = min(runner.cache_positions, -(-(position + 1) // 64) * 64)  # as ModelRunner.kv_span rounds

            def step() -> None:
                runner.state.position[slot] = position
                runner.eager_step(plan.slot_ids, plan.hints, kv_span, plan.text_span)

            def projections() -> None:
                for linear, inputs in linears:
                    linear(inputs)
            timings = {}
            for name, fn in (("step", step), ("linears", projections)):
                fn()
                samples = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - start)
                timings[name] = statistics.median(samples) * 1e3
            # K and V of both rows up to the position, every layer, as the attention reads them
            kv_bytes = 2 * 2 * (position + 1) * d * decoder.config.num_layers * runner.cache.self_k.element_size()
            results[position] = {"step_ms": timings["step"], "linears_ms": timings["linears"],
                                 "rest_ms": timings["step"] - timings["linears"], "kv_bytes": kv_bytes}
    return {"weight_bytes": decoder.step_weight_bytes(), "positions": results, "threads": args.threads,
            "linear_paths": sorted({f"{str(k[0]).removeprefix('torch.')} {k[1][0]}x{k[1][1]}: {v}"
                                    for k, v in chosen_paths().items()})}


def print_row(row: dict, bandwidth: float) -> None:
    variant = (row["dtype"] + ("+" + row["quantization"] if row["quantization"] else "")
               + (" compiled" if row["compiled"] else ""))
    for position, r in row["positions"].items():
        r["floor_ms"] = (row["weight_bytes"] + r["kv_bytes"]) / bandwidth * 1e3
        print(f"{row['model']:<7}{variant:<30}{row['threads']:>4}{position:>6}{r['step_ms']:>9.2f}"
              f"{r['linears_ms']:>9.2f}{r['rest_ms']:>8.2f}{r['floor_ms']:>8.2f}{r['step_ms'] / r['floor_ms']:>8.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--quantize", default=None, help="comma list (int8, int8-dynamic, int4): also run these in each dtype")
    parser.add_argument("--threads", default="1,2", help="comma list of torch intra-op thread counts")
    parser.add_argument("--positions", default="30,250,1500")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-float", action="store_true", help="run only the --quantize variants")
    parser.add_argument("--compile", action="store_true",
                        help="also run each variant with compile_step=True (minutes of compiling the first time)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.positions = [int(p) for p in str(args.positions).split(",")]
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(worker(args)))
        return
    machine, bandwidth = machine_name("cpu"), copy_bandwidth("cpu")
    print(f"machine: {machine}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (measured now)")
    print(f"{'model':<7}{'variant':<30}{'thr':>4}{'pos':>6}{'step ms':>9}{'linears':>9}{'rest':>8}{'floor':>8}"
          f"{'× floor':>8}", flush=True)
    rows = []
    for name in args.models.split(","):
        folder = checkpoint(name, "float32")
        for dtype in args.dtype.split(","):
            for quantize, compiled, threads in itertools.product([""] * (not args.skip_float) + quantize_modes(args.quantize),
                                                                 [False, True] if args.compile else [False],
                                                                 args.threads.split(",")):
                cmd = [sys.executable, __file__, "--worker", "--model-dir", str(folder), "--dtype", dtype,
                       "--threads", threads, "--repeats", str(args.repeats),
                       "--positions", ",".join(map(str, args.positions))]
                cmd += (["--quantize", quantize] if quantize else []) + (["--compile"] if compiled else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                row = {"model": name, "dtype": dtype, "quantization": quantize or None, "compiled": compiled,
                       **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print_row(row, bandwidth)
    write_result("cpu-step", "cpu", machine, args.out, {"copy_bandwidth_Bps": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
