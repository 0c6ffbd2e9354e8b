"""Small pieces of bench/gpu_report.sh: the versions file, the CUDA tests in parallel groups, and the summary of key
numbers printed last.

    python bench/report_tools.py versions --imported HOW --out versions.txt
    python bench/report_tools.py checkpoint small bfloat16     (build the random-weight checkpoint the steps share)
    python bench/report_tools.py pytest --junit cuda-tests.xml --group A.py B.py --group C.py -- -v -k "not cpu"
    python bench/report_tools.py summary RESULTS_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench/common.py, imported where needed: it imports fastgen, torch


def versions(imported: str, out: Path) -> None:
    import numpy
    import torch
    import transformers
    import triton

    import fastgen
    from common import atomic_write_text, machine_name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"machine: {machine_name(device)}",
             f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
             f"triton {triton.__version__}  transformers {transformers.__version__}  numpy {numpy.__version__}",
             f"fastgen {fastgen.__version__} from {os.path.dirname(fastgen.__file__)} ({imported})",
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}  cpus {os.cpu_count()}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        lines.append(f"gpu {props.name}  sm_{props.major}{props.minor}  {props.multi_processor_count} SMs  "
                     f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free)")
    for module in ("soundfile", "soxr", "scipy"):
        try:
            __import__(module)
            lines.append(f"{module}: present")
        except Exception as exc:  # absent on the lent GPU machine: fastgen must not need them
            lines.append(f"{module}: absent ({type(exc).__name__})")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out, text)
    print(text, end="")


def parallel_pytest(junit: Path, groups: list[list[str]], pytest_args: list[str]) -> int:
    """Each group of test files in its own pytest process, all at once: the tests' time is mostly Triton compiling
    kernels, single-threaded CPU work, so the groups compile side by side on the lent machine's cores while the GPU runs
    their small launches. Every output line is echoed with its group's number; the groups' junit files are merged into
    one. On SIGINT (the report's step timeout sends it to the whole process group) each pytest ends its session and
    writes its junit file, and the merge keeps the tests that finished."""
    with tempfile.TemporaryDirectory() as scratch:
        parts = [Path(scratch) / f"group-{i}.xml" for i in range(len(groups))]
        # -n 0: each group in its own process (the project's addopts would start xdist workers inside every group)
        procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-n", "0", *pytest_args, f"--junit-xml={part}",
                                   *files],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for part, files in zip(parts, groups)]

        def echo(i: int, stream) -> None:
            for line in stream:
                print(f"[{i}] {line}", end="", flush=True)
        echoes = [threading.Thread(target=echo, args=(i, p.stdout)) for i, p in enumerate(procs)]
        for thread in echoes:
            thread.start()
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # the groups got it too: wait while they write their junit files
            codes = [p.wait() for p in procs]
        for thread in echoes:
            thread.join()
        merged = ET.Element("testsuites")
        for part in parts:
            if part.is_file():
                root = ET.parse(part).getroot()
                merged.extend([root] if root.tag == "testsuite" else list(root))
        for key in ("tests", "failures", "errors", "skipped"):
            merged.set(key, str(sum(int(suite.get(key, 0)) for suite in merged)))
        ET.ElementTree(merged).write(junit, encoding="utf-8", xml_declaration=True)
    print(f"pytest groups exited {codes}; merged junit in {junit}", flush=True)
    return max(codes, key=abs)


def _json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary(results: Path) -> None:
    """The key numbers of whatever steps finished, one line each."""
    smoke = _json(results / "smoke.json")
    if smoke:
        checks = smoke.get("checks", [])
        bad = [c["name"] for c in checks if not c.get("ok")]
        print(f"smoke: {len(checks) - len(bad)}/{len(checks)} checks ok" + (f"; FAILED: {', '.join(bad)}" if bad
                                                                               else ""))
    if (results / "cuda-tests.xml").is_file():
        try:
            cases = [case for case in ET.parse(results / "cuda-tests.xml").getroot().iter("testcase")
                     if case.get("name")]  # (pytest interrupted by the timeout adds a nameless one)
        except ET.ParseError as error:
            print(f"cuda tests: unreadable junit file ({error})")
            cases = []
        outcome = {case: next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
                   for case in cases}
        counts = Counter(outcome.values())
        failed = [f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}" for case in cases
                  if outcome[case] in ("failure", "error")]
        print(f"cuda tests: {counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
              f"{counts['skipped']} skipped" + (f"; FAILED: {', '.join(failed[:10])}" if failed else ""))
    profile = _json(results / "profile.json")
    for row in profile.get("steps", []):
        linears = f" {row['linear_backend']} linears" if "linear_backend" in row else ""
        print(f"step {profile.get('mode', '')}{linears} bucket {row['bucket']:>3}: {row['ms_per_step']:.3f} ms "
              f"(bytes floor {row['floor_ms']:.3f} ms, {row['floor_ms'] / row['ms_per_step']:.0%} of it)")
    if profile.get("kernels"):
        kernels = profile["kernels"]
        print("kernels per step: " + ", ".join(f"{k} {v['count']} ({v['us']:.0f} µs)"
                                               for k, v in kernels["by_category"].items()))
    for stage in ("t5", "encodec"):
        if stage in profile:
            entry = profile[stage]
            print(f"{stage}: {entry['ms']:.2f} ms {entry['per']} (weights floor {entry['floor_ms']:.3f} ms)")
    e2e = {row["system"]: row for row in _json_lines(results / "e2e.jsonl")}
    for name, row in e2e.items():
        ratio = ""
        if name != "transformers" and "transformers" in e2e:
            ratio = f"  step {e2e['transformers']['step_ms'] / row['step_ms']:.2f}x, clip " \
                    f"{e2e['transformers']['total_s'] / row['total_s']:.2f}x transformers"
        print(f"e2e {row.get('model', '')} {name}: step {row['step_ms']:.3f} ms "
              f"(floor {row.get('floor_step_ms', 0):.3f} ms), clip {row['total_s']:.2f} s{ratio}")
    rows = _json_lines(results / "throughput.jsonl")
    theirs = max((r["audio_s_per_s"] for r in rows if not r["system"].startswith("fastgen")), default=None)
    for row in rows:
        ratio = f", {row['audio_s_per_s'] / theirs:.2f}x best transformers" if theirs and \
            row["system"].startswith("fastgen") else ""
        print(f"throughput {row['system']}: {row['audio_s_per_s']:.1f} audio s/s, p50 {row['p50_latency_s']:.2f} s"
              f"{ratio}")
    kernels = _json(results / "kernels.json")
    if kernels.get("rows"):
        speedups = [r["speedup"] for r in kernels["rows"]]
        print(f"kernel bench: {len(speedups)} rows, speedup vs eager min {min(speedups):.2f}x, "
              f"max {max(speedups):.2f}x")
    elif kernels:
        print(f"kernel bench: {kernels.get('skipped', 'no rows')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions")
    v.add_argument("--imported", default="installed")
    v.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("model")
    c.add_argument("dtype")
    t = sub.add_parser("pytest")
    t.add_argument("--junit", type=Path, required=True)
    t.add_argument("--group", action="append", nargs="+", required=True, help="test files run in one process")
    t.add_argument("pytest_args", nargs="*", help="after --: passed to every group's pytest")
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    args = parser.parse_args()
    if args.command == "versions":
        versions(args.imported, args.out)
    elif args.command == "checkpoint":
        from common import checkpoint
        print(checkpoint(args.model, args.dtype))
    elif args.command == "pytest":
        sys.exit(parallel_pytest(args.junit, args.group, args.pytest_args))
    else:
        summary(args.results)


if __name__ == "__main__":
    main()
