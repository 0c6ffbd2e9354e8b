"""A user's commands, run as a user runs them: in subprocesses started from the repository root (where Python puts
the checkout first on sys.path) and from bench/. Nothing in the checkout may shadow a third-party top-level package
there: transformers imports the PyPI package ``kernels``, and our ``kernels/`` folder (the sources of
``fastgen.kernels``) is no package of its own."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_from(folder: pathlib.Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} from {folder}: exit {done.returncode}\n{done.stdout[-2000:]}" \
                                 f"{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None
                    or importlib.util.find_spec("kernels").origin is None,
                    reason="the PyPI package `kernels` is not installed, so nothing can shadow it")
@pytest.mark.parametrize("folder", [".", "bench"])
def test_transformers_imports_its_own_kernels_package(folder):
    done = run_from(REPO / folder, "-c", "import transformers.models.musicgen.modeling_musicgen, kernels; "
                                         "print(kernels.__file__)")
    origin = pathlib.Path(done.stdout.strip()).resolve()
    assert REPO not in origin.parents, f"`kernels` came from the checkout: {origin}"


def test_fastgen_kernels_is_the_checkouts_kernels_folder():
    done = run_from(REPO, "-c", "import fastgen.kernels.sampling as m; print(m.__file__)")
    assert pathlib.Path(done.stdout.strip()).resolve() == (REPO / "kernels" / "sampling.py").resolve()


@pytest.mark.slow
def test_readme_commands_run_from_the_repository_root(tmp_path):
    """The quick start's commands: a tiny checkpoint, the CLI's help, a bench script's help."""
    run_from(REPO, "-m", "fastgen.tiny", str(tmp_path / "tiny"))
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert "generate" in run_from(REPO, "-m", "fastgen.cli", "--help").stdout
    assert "--models" in run_from(REPO, "bench/e2e.py", "--help").stdout


def test_ci_runs_the_readme_test_command():
    """CI runs exactly what the README tells a developer to run."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"```(?:bash|sh)?\n(python -m pip install torch[^\n]*pytest[^\n]*)\n```", readme)
    assert command, "the README's test command (pip install torch … pytest …) is missing"
    assert command.group(1) in (REPO / ".ci" / "run").read_text()


def test_import_fastgen_makes_openmp_threads_spin_briefly_then_sleep():
    """OpenMP reads its wait settings once, when torch loads it: ``import fastgen`` sets a passive policy with a short
    spin first (bench/contention.py), unless the user chose a policy; a spin count of the user's own is kept."""
    script = ("import os, fastgen, torch; "
              "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))")
    clean = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for given, expected in (({}, "PASSIVE 1000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE -"),
                            ({"GOMP_SPINCOUNT": "7"}, "PASSIVE 7")):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=clean | given, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == expected, (given, done.stdout, done.stderr[-2000:])
