"""The build of the C++ CPU kernels: a folder keyed by the sources and the torch build, one line on stderr when it
compiles and none when it loads a finished build, and processes starting together waiting for one build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from fastgen.kernels import _cpu_extension as ext


def test_the_build_folder_is_keyed_by_the_sources_and_flags(tmp_path, monkeypatch):
    for source in ext.SOURCES:
        shutil.copy(source, tmp_path)
    copies = sorted(str(path) for path in tmp_path.glob("cpu_*.cpp"))
    monkeypatch.setattr(ext, "SOURCES", copies)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    folder = ext.build_folder()
    assert folder.parent == tmp_path / "extensions" and folder.name.startswith("fastgen_cpu-")
    assert ext.build_folder() == folder  # the same sources, the same folder: a finished build is found again
    with open(copies[0], "a") as source:
        source.write("// an edit\n")
    edited = ext.build_folder()
    assert edited != folder
    monkeypatch.setattr(ext, "CFLAGS", ext.CFLAGS + ["-g"])
    assert ext.build_folder() not in (folder, edited)


def test_a_build_says_so_and_a_finished_one_is_silent(tmp_path, monkeypatch, capsys):
    def load(name, build_directory, **kwargs):
        # torch's lock left by a process killed mid-build would make torch's load wait forever
        assert not (Path(build_directory) / "lock").exists()
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    folder = tmp_path / "fastgen_cpu-key"
    folder.mkdir()
    (folder / "lock").touch()
    ext._build_and_load(folder)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("building fastgen's CPU kernels (once, about ")
    assert lines[1].startswith("built fastgen's CPU kernels in ") and lines[1].endswith(f" s ({folder})")
    ext._build_and_load(folder)
    assert capsys.readouterr().err == ""


# A one-function source stands in for the kernels' (their build is ~40 s of compiler time; this one a few seconds):
# what is under test is the folder, the lock and the messages, which are the same whatever the sources.
_PROBE = """
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor echo(const at::Tensor& x) { return x; }
TORCH_LIBRARY(fastgen_build_probe, m) { m.def("echo(Tensor x) -> Tensor", echo); }
"""
# each process imports torch, says it is ready (a file), and starts loading once the other is ready too
_LOAD = ("import pathlib, sys, time, torch; from fastgen.kernels import _cpu_extension as ext; "
         "ext.SOURCES = [sys.argv[1]]; ready = pathlib.Path(sys.argv[2]); ready.mkdir(exist_ok=True); "
         "(ready / sys.argv[3]).touch(); start = time.monotonic()\n"
         "while len(list(ready.iterdir())) < int(sys.argv[4]) and time.monotonic() - start < 120: time.sleep(0.01)\n"
         "ext._build_and_load(ext.build_folder()); torch.ops.fastgen_build_probe.echo")


@pytest.mark.slow
def test_processes_starting_together_share_one_build(tmp_path):
    source = tmp_path / "cpu_probe.cpp"
    source.write_text(_PROBE)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    load = [sys.executable, "-c", _LOAD, str(source), str(tmp_path / "ready")]
    starts = [subprocess.Popen(load + [f"process-{i}", "2"], env=env, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    errs = [process.communicate(timeout=900)[1] for process in starts]
    assert [process.returncode for process in starts] == [0, 0], errs
    # one compiled, the other waited for it and loaded its library
    assert sorted("building fastgen's CPU kernels" in err for err in errs) == [False, True], errs
    assert sorted("waiting for another process's build" in err for err in errs) == [False, True], errs
    folder, = (tmp_path / "extensions").glob("fastgen_cpu-*")
    built = _ninja_log(folder)
    assert sorted(built) == ["cpu_probe.o", "fastgen_cpu.so"], built
    # a later load finds the build: nothing compiled, nothing said
    later = subprocess.run(load + ["later", "1"], env=env, stderr=subprocess.PIPE, text=True, timeout=300)
    assert later.returncode == 0, later.stderr
    assert "fastgen's CPU kernels" not in later.stderr
    assert _ninja_log(folder) == built


def _ninja_log(folder: Path) -> list[str]:
    """The outputs ninja built in the folder, one entry per build of each."""
    return [line.split("\t")[3] for line in (folder / ".ninja_log").read_text().splitlines()[1:]]
