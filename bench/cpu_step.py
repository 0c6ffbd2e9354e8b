"""The decode step at a given cache position, split into its projections and everything else, beside the floor.

One request (CFG: 2 rows) is admitted; the step is then timed at each position by setting the slot's position
counter (the cache's contents do not change the cost of reading it), so position 1500 costs no 1500-step
generation. "linears" is the same step's projections alone (every layer's, in order, at 2 rows, so weights stream
from DRAM as in the step); "rest" = step − linears is attention over the cache, layer norms, embedding, sampling
and the host loop. The floor streams the step's weights once plus the K/V the attention reads, at the copy
bandwidth.

Every variant is loaded into one process per thread count and the variants are timed round-robin, one step each
per round, with the copy bandwidth measured in every round too: a shared machine's speed drifts by tens of percent
within minutes, and interleaving puts every variant (and the floor) under the same drift. Each figure is the
median over --repeats rounds; "× floor" is the median of the per-round ratios.

    python bench/cpu_step.py --models small --dtype float32,bfloat16 --quantize int8,int8-dynamic,int4 --threads 1,2
    python bench/cpu_step.py --models small --dtype float32 --quantize int4 --skip-float --threads 2 --compile
    python bench/cpu_step.py --models small --threads 2 --variants bfloat16,bfloat16+compiled,float32+int4+compiled
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, copy_bandwidth, machine_name, quantize_modes, write_result  # noqa: E402


# a variant may pin the float projections to one CPU path instead of the one measured fastest at load
PINNABLE_PATHS = ("aten", "onednn-packed", "gemv")


def variant_name(dtype: str, quantization: str | None, compiled: bool, cpu_path: str | None = None,
                 layerwise: bool = False) -> str:
    return (dtype + (f"+{quantization}" if quantization else "") + (f"+{cpu_path}" if cpu_path else "")
            + ("+layerwise" if layerwise else "") + (" compiled" if compiled else ""))


def parse_variant(spec: str) -> dict:
    """"float32+int4+compiled" → {"dtype": "float32", "quantization": "int4", "compiled": True, "cpu_path": None};
    "bfloat16+onednn-packed" pins the projections to oneDNN's packed path; "+layerwise" runs an eager step's layers
    one operator at a time instead of through fastgen.kernels.cpu_decoder_layers (the same result)."""
    dtype, *rest = spec.split("+")
    flags = {"compiled", "layerwise"}
    paths = [part for part in rest if part in PINNABLE_PATHS]
    quantizations = quantize_modes(",".join(part for part in rest if part not in flags and part not in paths))
    if dtype not in ("float32", "bfloat16", "float16") or len(quantizations) > 1 or len(paths) > 1:
        raise SystemExit(f"--variants: cannot read {spec!r} (DTYPE[+QUANTIZATION][+CPU_PATH][+layerwise][+compiled])")
    return {"dtype": dtype, "quantization": quantizations[0] if quantizations else None, "compiled": "compiled" in rest,
            "cpu_path": paths[0] if paths else None, "layerwise": "layerwise" in rest}


def load_variant(model_dir: str, dtype: str, quantization: str | None, compiled: bool,
                 cpu_path: str | None = None, layerwise: bool = False) -> dict:
    """An engine with one request admitted, and its step and projections as callables of a position."""
    import torch

    import fastgen
    from fastgen.model import cpu_paths as linear_module
    measured = linear_module.CPU_PATHS
    linear_module._CHOSEN.clear()  # each variant chooses (or is pinned) afresh; the paths it got are reported
    if cpu_path:
        linear_module.CPU_PATHS = (cpu_path,)
    try:
        engine = fastgen.Engine.from_pretrained(model_dir, dtype=getattr(torch, dtype), max_slots=1,
                                                backend="torch", quantization=quantization, compile_step=compiled)
    finally:
        linear_module.CPU_PATHS = measured
    paths = sorted({f"{str(k[0]).removeprefix('torch.')} {k[1][0]}x{k[1][1]}: {v}"
                    for k, v in linear_module.chosen_paths().items()})
    runner, decoder = engine.runner, engine.model.decoder
    decoder.cpu_layers_op = not layerwise
    longest = engine.max_frames / engine.frame_rate  # the slot's full length: every position below is in range
    engine.add_request(PROMPTS[0], fastgen.SamplingParams(duration=longest, guidance_scale=3.0, top_k=250, seed=0))
    engine.step()  # admit and run the first step
    # only the decoder is timed from here: T5 and EnCodec go, so that every variant fits in one process's memory
    engine.model.text_encoder = engine.model.codec = engine.runner.text_encoder = engine.runner.codec = None
    gc.collect()
    requests = list(engine.scheduler.running.values())
    plan = runner.plan(requests)
    slot = requests[0].slot
    d = decoder.config.hidden_size
    x = {width: torch.randn(2, width, dtype=decoder.dtype) for width in (d, decoder.config.ffn_dim)}
    # the LM heads run as the step runs them (head_logits: fp32 logits, the head kept in fp32 off CUDA)
    linears = [(decoder.head_logits if linear is decoder.lm_heads else linear,
                x[d] if i % 6 != 5 or linear is decoder.lm_heads else x[decoder.config.ffn_dim])
               for i, linear in enumerate(decoder.linears())]

    def step(position: int) -> None:
        kv_span = min(runner.cache_positions, -(-(position + 1) // 64) * 64)  # as ModelRunner.kv_span rounds
        runner.state.position[slot] = position
        runner.eager_step(plan.slot_ids, plan.hints, kv_span, plan.text_span)

    def projections(position: int) -> None:
        for linear, inputs in linears:
            linear(inputs)
    return {"engine": engine, "step": step, "linears": projections, "cache_positions": runner.cache_positions,
            "linear_paths": paths,
            "weight_bytes": decoder.step_weight_bytes(),
            # K and V of both rows per position, every layer, as the attention reads them
            "kv_bytes_per_position": 2 * 2 * d * decoder.config.num_layers * runner.cache.self_k.element_size()}


def worker(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    variants = [json.loads(spec) for spec in args.variant]
    loaded = [load_variant(args.model_dir, **v) for v in variants]
    results = [{**v, "threads": args.threads, "weight_bytes": entry["weight_bytes"], "positions": {},
                "linear_paths": entry["linear_paths"]} for v, entry in zip(variants, loaded)]
    with torch.inference_mode():
        for position in args.positions:
            samples = [{"step": [], "linears": [], "ratio": []} for _ in loaded]
            bandwidths = []
            for round_index in range(args.repeats + 1):  # round 0 warms up
                bandwidth = copy_bandwidth("cpu", repeats=1)
                for entry, sample in zip(loaded, samples):
                    if position >= entry["cache_positions"]:
                        continue
                    timings = {}
                    for name in ("step", "linears"):
                        start = time.perf_counter()
                        entry[name](position)
                        timings[name] = time.perf_counter() - start
                    if round_index:
                        floor = (entry["weight_bytes"] + entry["kv_bytes_per_position"] * (position + 1)) / bandwidth
                        sample["step"].append(timings["step"])
                        sample["linears"].append(timings["linears"])
                        sample["ratio"].append(timings["step"] / floor)
                if round_index:
                    bandwidths.append(bandwidth)
            for entry, sample, result in zip(loaded, samples, results):
                if not sample["step"]:
                    continue
                bandwidth = statistics.median(bandwidths)
                step, linears = statistics.median(sample["step"]) * 1e3, statistics.median(sample["linears"]) * 1e3
                kv_bytes = entry["kv_bytes_per_position"] * (position + 1)
                result["positions"][position] = {
                    "step_ms": step, "linears_ms": linears, "rest_ms": step - linears, "kv_bytes": kv_bytes,
                    "copy_bandwidth_Bps": bandwidth,
                    "floor_ms": (entry["weight_bytes"] + kv_bytes) / bandwidth * 1e3,
                    "step_over_floor": statistics.median(sample["ratio"])}
    return results


def print_row(row: dict) -> None:
    variant = variant_name(row["dtype"], row["quantization"], row["compiled"], row.get("cpu_path"),
                           row.get("layerwise", False))
    for position, r in row["positions"].items():
        print(f"{row['model']:<7}{variant:<30}{row['threads']:>4}{position:>6}{r['step_ms']:>9.2f}"
              f"{r['linears_ms']:>9.2f}{r['rest_ms']:>8.2f}{r['floor_ms']:>8.2f}{r['step_over_floor']:>8.2f}"
              f"{r['copy_bandwidth_Bps'] / 1e9:>7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--quantize", default=None,
                        help="comma list (int8, int8-dynamic, int4): also run these in each dtype")
    parser.add_argument("--skip-float", action="store_true", help="run only the --quantize variants")
    parser.add_argument("--compile", action="store_true",
                        help="also run each variant with compile_step=True (minutes of compiling the first time)")
    parser.add_argument("--variants", default=None,
                        help="instead of the product of the flags above: a comma list such as "
                             "float32,float32+int4,float32+int4+compiled,bfloat16+compiled; a CPU path "
                             f"({', '.join(PINNABLE_PATHS)}) in a variant pins its float projections to it; "
                             "+layerwise runs the eager layers without the one-call C++ operator")
    parser.add_argument("--threads", default="1,2", help="comma list of torch intra-op thread counts")
    parser.add_argument("--positions", default="30,250,1500")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each times every variant once)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--variant", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.positions = [int(p) for p in str(args.positions).split(",")]
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(worker(args)))
        return
    machine = machine_name("cpu")
    print(f"machine: {machine}; variants interleaved in one process per thread count")
    print(f"{'model':<7}{'variant':<30}{'thr':>4}{'pos':>6}{'step ms':>9}{'linears':>9}{'rest':>8}{'floor':>8}"
          f"{'× floor':>8}{'GB/s':>7}", flush=True)
    if args.variants:
        variants = [parse_variant(spec) for spec in args.variants.split(",")]
    else:
        quantizations = [None] * (not args.skip_float) + quantize_modes(args.quantize)
        variants = [{"dtype": dtype, "quantization": quantization, "compiled": compiled, "cpu_path": None}
                    for dtype, quantization, compiled in itertools.product(
                        args.dtype.split(","), quantizations, [False, True] if args.compile else [False])]
    rows = []
    for name, threads in itertools.product(args.models.split(","), args.threads.split(",")):
        cmd = [sys.executable, __file__, "--worker", "--model-dir", str(checkpoint(name, "float32")),
               "--threads", threads, "--repeats", str(args.repeats), "--positions", ",".join(map(str, args.positions))]
        cmd += [arg for v in variants for arg in ("--variant", json.dumps(v))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append({"model": name, **row})
            print_row(rows[-1])
    write_result("cpu-step", "cpu", machine, args.out, {"rows": rows})


if __name__ == "__main__":
    main()
