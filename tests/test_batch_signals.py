"""Interrupting a real `fastgen generate` process with real signals: it stops admitting, lets running requests finish
within the grace period (or abandons them), leaves no partial or unrecorded file, says what is done and left and how
to resume, and exits 130 (SIGINT) / 143 (SIGTERM) without a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastgen.batch.writer import OutputFolder

JOBS = 400


@pytest.mark.parametrize("signum,grace", [(signal.SIGINT, "10"), (signal.SIGTERM, "0")], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(tmp_path, tiny_mono_dir, signum, grace):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": f"clip {i}", "seed": i}) + "\n" for i in range(JOBS)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastgen.cli", "generate", "--model", str(tiny_mono_dir), "--manifest",
           str(manifest), "--out", str(out), "--device", "cpu", "--max-slots", "2", "--duration", "1",
           "--grace", grace]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 300
        results = out / "results.jsonl"
        while not (results.exists() and results.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no output within 300 s"
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Resume with:" in stderr and "--skip-existing" in stderr.split("Resume with:")[1]
    done = OutputFolder(out).completed()
    files = sorted(p.name for p in out.iterdir() if p.name != "results.jsonl")
    assert files == sorted(r["file"] for r in done.values())  # every file whole and recorded; no temporary left
    assert 2 <= len(done) < JOBS
    assert f"{len(done)} output(s) written this run, {JOBS - len(done)} left" in stderr
    assert len(stdout.splitlines()) == len(done)
