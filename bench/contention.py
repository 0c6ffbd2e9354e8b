"""A busy machine: how much slower a CPU generation runs when every core is busy with another process.

Each measurement is a fresh process (OpenMP reads its wait policy once, when torch loads it) that loads the model,
warms up and times one generation. Variants: fastgen's default (``import fastgen`` sets OMP_WAIT_POLICY=PASSIVE and
GOMP_SPINCOUNT=1000: a waiting thread spins ~20 us, then sleeps), another spin count (--spin-count; 0 sleeps at once),
threads that always spin (OMP_WAIT_POLICY=ACTIVE), and 1 thread. Conditions: idle; beside one busy-loop process per core; beside one
multi-threaded torch process (as many threads as cores, OpenMP's own spinning default: another engine, a training
job). Neighbours are started here and stopped by pid. Rounds interleave the variants and conditions, so the machine's
drift enters every ratio alike. The ratio that matters is busy / idle per variant: the fair share of a machine shared
with as many busy threads as cores is about half, so ~2x.

    python bench/contention.py                      # tiny model, 4 s clip
    python bench/contention.py --model small --seconds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, machine_name, write_result  # noqa: E402

CHILD = """
import sys, time, json
import fastgen, torch
threads = int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
model = fastgen.MusicGen.from_pretrained(sys.argv[1], device="cpu")
params = fastgen.SamplingParams(duration=float(sys.argv[3]), seed=1)
model.generate([sys.argv[4]], fastgen.SamplingParams(duration=0.2, seed=1))
start = time.perf_counter()
model.generate([sys.argv[4]], params)
print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))
"""
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # cleared in every child, then set as the variant says
# (GNU OpenMP's GOMP_SPINCOUNT, when given, sets the spin whatever the policy)
SPIN_COUNT_VARIANT = "spin count (GOMP_SPINCOUNT; default 0)"
VARIANT_NAMES = ("fastgen default (spin 1000 then sleep)", SPIN_COUNT_VARIANT, "active wait (always spin)", "1 thread")


def variants(spin_count: int) -> dict[str, tuple[dict, int]]:
    """name → (environment changes, threads; 0 = torch's default)"""
    return dict(zip(VARIANT_NAMES, [({}, 0), ({"GOMP_SPINCOUNT": str(spin_count)}, 0),
                                    ({"OMP_WAIT_POLICY": "ACTIVE"}, 0), ({}, 1)]))
TORCH_NEIGHBOUR = ("import torch\ntorch.set_num_threads({threads})\na = torch.randn(256, 256)\n"
                   "while True: a = torch.tanh(a @ a)")
CONDITIONS = ("idle", "busy loops", "torch")


def neighbours_for(condition: str, cores: int) -> list[subprocess.Popen]:
    if condition == "busy loops":
        return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    if condition == "torch":
        env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
        return [subprocess.Popen([sys.executable, "-c", TORCH_NEIGHBOUR.format(threads=cores)], env=env)]
    return []


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        os.kill(process.pid, 9)
        process.wait()


def measure(folder: Path, changes: dict, threads: int, seconds: float, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES} | changes
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(threads), str(seconds), PROMPTS[0]],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "timed_out_after_s": timeout}
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, small, medium, large or a checkpoint folder")
    parser.add_argument("--dtype", default="float32", help="of a random-weight checkpoint built for --model")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio seconds generated per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--neighbours", type=int, default=os.cpu_count(),
                        help="busy-loop processes, and the torch neighbour's threads (default: cores)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per measurement; a collapse is cut here")
    parser.add_argument("--spin-count", type=int, default=0, help="GOMP_SPINCOUNT of the spin-count variant")
    parser.add_argument("--variants", default=",".join(VARIANT_NAMES), help="comma list of the variants to run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = args.variants.split(",")
    runs = {name: spec for name, spec in variants(args.spin_count).items() if name in chosen}
    if len(runs) != len(chosen):
        parser.error(f"--variants: choose among {', '.join(VARIANT_NAMES)}")
    folder = checkpoint(args.model, args.dtype)
    times: dict[str, dict[str, list]] = {v: {c: [] for c in CONDITIONS} for v in runs}
    for round_index in range(args.rounds):
        for condition in CONDITIONS:
            neighbours = neighbours_for(condition, args.neighbours)
            try:
                time.sleep(2.0 if neighbours else 0)  # (the torch neighbour imports torch first)
                for variant, (changes, threads) in runs.items():
                    result = measure(folder, changes, threads, args.seconds, args.timeout)
                    times[variant][condition].append(result["seconds"])
                    print(f"round {round_index}: {variant:<32} {condition:<10} {result}", flush=True)
            finally:
                stop(neighbours)
    rows = []
    for variant, by_condition in times.items():
        idle = statistics.median(by_condition["idle"])
        row = {"variant": variant, "idle_s": idle, "runs": by_condition}
        for condition in CONDITIONS[1:]:
            busy = statistics.median([t if t is not None else args.timeout for t in by_condition[condition]])
            row[condition] = {"seconds": busy, "over_idle": busy / idle}
        rows.append(row)
        print(f"{variant:<32} idle {idle:6.2f} s" + "".join(
            f"  {c} {row[c]['seconds']:6.2f} s ({row[c]['over_idle']:.2f}x)" for c in CONDITIONS[1:]))
    write_result("contention", "cpu", machine_name("cpu"), args.out,
                 {"model": args.model, "audio_seconds": args.seconds, "neighbours": args.neighbours,
                  "torch_neighbour": TORCH_NEIGHBOUR.format(threads=args.neighbours), "spin_count": args.spin_count,
                  "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
