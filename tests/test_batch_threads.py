"""Threads: `fastgen generate --threads N` and the Python API's ``cpu_threads`` (MusicGen, Engine, AsyncEngine) and
$FASTGEN_CPU_THREADS all mean the intra-op thread count the engine's decode runs with: checked with
torch.get_num_threads() inside the engine's step, validated before anything loads (a positive integer, the error
naming the parameter), and left as today's default when not given."""
from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.cli import main
from fastgen.engine.engine import Engine
from fastgen.engine.threads import CPU_THREADS_ENV

# a count other than the process's own, so that seeing it inside the step proves the setting reached the engine
OTHER = 1 if torch.get_num_threads() > 1 else 2


@pytest.fixture
def step_threads(monkeypatch):
    """torch.get_num_threads() in every Engine step, whichever thread runs it."""
    seen: list[int] = []
    real = Engine._step

    def spy(self):
        seen.append(torch.get_num_threads())
        return real(self)
    monkeypatch.setattr(Engine, "_step", spy)
    return seen


def test_threads_flag_reaches_the_engines_step(capsys, tmp_path, tiny_mono_dir, step_threads, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    code = main(["generate", "x", "--model", str(tiny_mono_dir), "--out", str(tmp_path / "out"), "--duration", "0.2",
                 "--device", "cpu", "--max-slots", "1", "--threads", str(OTHER)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert step_threads and set(step_threads) == {OTHER}
    assert f"{OTHER} CPU thread(s)" in err  # the load line says it
    assert torch.get_num_threads() == before  # the caller's own setting is left as it was


def test_default_threads_are_the_callers(capsys, tmp_path, tiny_mono_dir, step_threads, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    code = main(["generate", "x", "--model", str(tiny_mono_dir), "--out", str(tmp_path / "out"), "--duration", "0.2",
                 "--device", "cpu", "--max-slots", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert set(step_threads) == {torch.get_num_threads()}
    assert f"{torch.get_num_threads()} CPU thread(s)" in err


@pytest.mark.parametrize("flag,env,named", [("0", None, "--threads"), ("-2", None, "--threads"),
                                             (None, "many", CPU_THREADS_ENV), (None, "0", CPU_THREADS_ENV)])
def test_bad_threads_exit_2_before_loading(capsys, tmp_path, tiny_mono_dir, monkeypatch, flag, env, named):
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", None)
    if env is None:
        monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(CPU_THREADS_ENV, env)
    extra = ["--threads", flag] if flag is not None else []
    code = main(["generate", "x", "--model", str(tiny_mono_dir), "--out", str(tmp_path / "out"), *extra])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("fastgen: error: ") and named in line and "positive integer" in line


@pytest.mark.parametrize("load", [fastgen.MusicGen.from_pretrained, Engine.from_pretrained,
                                  fastgen.AsyncEngine.from_pretrained], ids=["MusicGen", "Engine", "AsyncEngine"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_python_api_refuses_bad_cpu_threads_before_loading(tmp_path, monkeypatch, load, bad):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    with pytest.raises(ValueError, match=r"^cpu_threads must be a positive integer"):
        load(tmp_path / "no-such-checkpoint", cpu_threads=bad)
    monkeypatch.setenv(CPU_THREADS_ENV, "two")
    with pytest.raises(ValueError, match=rf"^{CPU_THREADS_ENV} must be a positive integer.*'two'"):
        load(tmp_path / "no-such-checkpoint")


def test_python_api_cpu_threads_and_environment(tiny_mono_dir, step_threads, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    params = fastgen.SamplingParams(duration=0.1)
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, cpu_threads=OTHER, max_slots=1)
    assert model.engine.cpu_threads == OTHER
    model.generate(["a"], params)
    assert set(step_threads) == {OTHER}
    assert fastgen.MusicGen.from_pretrained(tiny_mono_dir, max_slots=1).engine.cpu_threads is None  # the caller's
    monkeypatch.setenv(CPU_THREADS_ENV, str(OTHER))
    step_threads.clear()
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, max_slots=1)
    assert model.engine.cpu_threads == OTHER
    model.generate(["a"], params)
    assert set(step_threads) == {OTHER}
    # the argument wins over the environment
    assert Engine.from_pretrained(tiny_mono_dir, cpu_threads=3, max_slots=1).cpu_threads == 3


def test_async_engine_loop_runs_with_cpu_threads(tiny_mono_dir, step_threads, monkeypatch):
    """The AsyncEngine's loop thread decodes with cpu_threads (default 1, as before), recorded on both objects."""
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    for given, expected in ((None, 1), (2, 2)):
        step_threads.clear()
        engine = fastgen.AsyncEngine.from_pretrained(tiny_mono_dir, cpu_threads=given, max_slots=1)
        try:
            assert engine.cpu_threads == engine.engine.cpu_threads == expected
            engine.submit("a", fastgen.SamplingParams(duration=0.1)).result(timeout=120)
            assert set(step_threads) == {expected}
        finally:
            engine.shutdown_sync()
