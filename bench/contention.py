"""A busy machine: how much slower a CPU generation runs when every core is busy with another process.

Each measurement is a fresh process (OpenMP reads its wait policy once, when torch loads it) that loads the model,
warms up and times one generation. Variants: fastgen's default (OpenMP threads sleep while they wait,
OMP_WAIT_POLICY=PASSIVE, set by ``import fastgen``), OpenMP's own default (threads spin: what a process that imported
torch before fastgen gets), and 1 thread. Conditions: idle, and beside one busy-loop process per core (started here,
stopped by pid). Rounds interleave the variants and conditions, so the machine's drift enters every ratio alike. The
ratio that matters is busy / idle per variant: the fair share of a machine shared with as many busy processes as cores
is about half, so ~2x.

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
VARIANTS = {"fastgen default (passive wait)": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
            "OpenMP default (spinning wait)": ({"OMP_WAIT_POLICY": None}, 0),
            "1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1)}


def busy_neighbours(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        os.kill(process.pid, 9)
        process.wait()


def measure(folder: Path, variant: str, seconds: float, timeout: float) -> dict:
    changes, threads = VARIANTS[variant]
    env = dict(os.environ)
    for key, value in changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
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
    parser.add_argument("--neighbours", type=int, default=os.cpu_count(), help="busy-loop processes (default: cores)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per measurement; a collapse is cut here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = checkpoint(args.model, args.dtype)
    times: dict[str, dict[str, list]] = {v: {"idle": [], "busy": []} for v in VARIANTS}
    for round_index in range(args.rounds):
        for condition in ("idle", "busy"):
            neighbours = busy_neighbours(args.neighbours) if condition == "busy" else []
            try:
                time.sleep(0.5 if neighbours else 0)
                for variant in VARIANTS:
                    result = measure(folder, variant, args.seconds, args.timeout)
                    times[variant][condition].append(result["seconds"])
                    print(f"round {round_index}: {variant:<32} {condition:<5} {result}", flush=True)
            finally:
                stop(neighbours)
    rows = []
    for variant, by_condition in times.items():
        idle = statistics.median(by_condition["idle"])
        busy = [t if t is not None else args.timeout for t in by_condition["busy"]]
        rows.append({"variant": variant, "idle_s": idle, "busy_s": statistics.median(busy),
                     "busy_over_idle": statistics.median(busy) / idle, "runs": by_condition})
        print(f"{variant:<32} idle {idle:7.2f} s  busy {statistics.median(busy):7.2f} s  "
              f"busy/idle {statistics.median(busy) / idle:6.2f}x")
    write_result("contention", "cpu", machine_name("cpu"), args.out,
                 {"model": args.model, "audio_seconds": args.seconds, "neighbours": args.neighbours,
                  "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
