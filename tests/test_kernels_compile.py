"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90, without spills (no GPU needed).

Compilation runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled ahead of time);
Triton's cache makes reruns fast.
"""
import json
import os
import subprocess
import sys

import pytest

from fastgen.kernels import _aot

pytestmark = pytest.mark.slow  # see pyproject's markers: the quick tier leaves it out

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    reason = _aot.aot_unavailable()
    if reason is not None:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("aot") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "fastgen.kernels._aot", "--arch", *map(str, ARCHS), "--json",
                          str(path)], capture_output=True, text=True, env=env, timeout=900)
    print(run.stdout)
    if not path.exists():
        pytest.fail(f"ahead-of-time compilation failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr[-5000:]}")
    return json.loads(path.read_text()), run.stdout


def test_every_engine_config_compiles(resources):
    rows, report = resources
    labels = {(r["label"], r["num_warps"], r["num_stages"], r["arch"]) for r in rows}
    for kernel in ("embedding", "attention split", "sampling", "int8 linear", "fused linear"):
        assert any(label.startswith(kernel) for label, *_ in labels), f"no {kernel} configuration compiled"
    assert {arch for *_, arch in labels} == set(ARCHS)


def test_no_register_spills(resources):
    rows, report = resources
    spills = [r for r in rows if r["stack"] > 0 or r["local"] > 0]
    assert not spills, "kernels spill (STACK or LOCAL > 0):\n" + report


def test_shared_memory_fits(resources):
    rows, _ = resources
    too_big = [r for r in rows if r["shared"] + r["dynamic_shared"] > 99 * 1024]  # sm_80/sm_86 per-block limit
    assert not too_big, too_big
