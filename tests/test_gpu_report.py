"""bench/gpu_report.sh --dry-run: the GPU report's script runs end to end on a CPU (TRITON_INTERPRET=1, tiny sizes)
and writes the same set of files it writes on a GPU, so the script cannot rot between GPU leases. Through the shim
import path (the one a GPU machine without an editable install uses), from outside the repository root."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from xml.etree import ElementTree

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES = {"versions.txt", "smoke.json", "profile.json", "e2e.jsonl", "throughput.jsonl", "cuda-tests.xml",
         "kernels.json", "report.log"}  # the device tool returns at most 8


@pytest.mark.slow
def test_dry_run_writes_every_file_of_the_gpu_report(tmp_path):
    out = tmp_path / "out"
    results_before = sorted((REPO / "bench" / "results").rglob("*"))
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "FASTGEN_REPORT_SHIM": "1",
           "FASTGEN_BENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_report.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES
    assert sorted((REPO / "bench" / "results").rglob("*")) == results_before  # nothing outside $OUT
    assert "the checkout" in (out / "versions.txt").read_text()
    smoke = json.loads((out / "smoke.json").read_text())
    assert [c["name"] for c in smoke["checks"] if c["ok"]] == [
        "parity-fp32-mono", "bf16-finite", "steps-per-call-4", "async-stage-worker-abort"], smoke
    profile = json.loads((out / "profile.json").read_text())
    assert [row["bucket"] for row in profile["steps"]] == [1, 2]
    assert all(row["ms_per_step"] > 0 and row["floor_ms"] > 0 for row in profile["steps"])
    assert profile["kernels"]["total"] > 20 and profile["t5"]["ms"] > 0 and profile["encodec"]["ms"] > 0
    e2e = [json.loads(line) for line in (out / "e2e.jsonl").read_text().splitlines()]
    assert [row["system"] for row in e2e] == ["fastgen", "transformers"]
    throughput = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert [row["system"] for row in throughput] == ["fastgen", "transformers(batch=3)"]
    # the CUDA tests run right after the smoke step, before the long benchmarks; each test group in its own process
    steps = ["versions", "smoke", "cuda-tests", "checkpoint", "profile", "e2e", "throughput", "kernel-bench"]
    started = [line.split("]")[0].removeprefix("=== [") for line in done.stdout.splitlines()
               if line.startswith("=== [") and "(timeout" in line]
    assert started == steps, started
    cases = [case for case in ElementTree.parse(out / "cuda-tests.xml").getroot().iter("testcase")]
    assert len({case.get("classname") for case in cases}) >= 2 and all(len(case) == 0 for case in cases), \
        ElementTree.tostring(ElementTree.parse(out / "cuda-tests.xml").getroot())[:2000]
    summary = done.stdout[done.stdout.rindex("=== summary"):]  # printed last
    for step in steps:
        assert f"  {step}: ok" in summary, summary
    assert "smoke: 4/4 checks ok" in summary and "throughput fastgen:" in summary
    assert f"cuda tests: {len(cases)} passed, 0 failed, 0 errors, 0 skipped" in summary, summary
