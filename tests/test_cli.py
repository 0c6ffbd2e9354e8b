"""The command line: `fastgen generate` writes one valid 32 kHz audio file per prompt or manifest output, records each
in results.jsonl, resumes from it with --skip-existing, reads --prompts-file, adds --unconditional clips, is
deterministic with --seed, refuses bad arguments before loading anything with exit code 2 and a one-line message, and
falls back to the built-in tiny random checkpoint (with a warning) without --model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import soundfile

import fastgen
import fastgen.cli
from fastgen.batch.writer import OutputFolder
from fastgen.cli import NOISE_WARNING, main

SR = 32000
HOP = 640  # samples per codec frame (50 Hz)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gen_args(model: Path, out: Path, *extra: str, duration: str = "0.5") -> list[str]:
    return ["--model", str(model), "--out", str(out), "--duration", duration, "--device", "cpu", "--max-slots", "2",
            *extra]


def records(stdout: str) -> list[dict]:
    """The JSON line per written file, in file-name order (files are written in completion order)."""
    return sorted((json.loads(line) for line in stdout.splitlines() if line.strip()), key=lambda r: r["name"])


def audio_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.suffix in (".wav", ".flac", ".ogg"))


def recorded(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_generate_writes_one_wav_per_prompt(capsys, tmp_path, tiny_mono_dir, tiny_stereo_dir, stereo):
    model = tiny_stereo_dir if stereo else tiny_mono_dir
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "prompt a", "prompt b", *gen_args(model, out))
    assert code == 0, stderr
    files = audio_files(out)
    assert [f.name for f in files] == ["000_prompt_a.wav", "001_prompt_b.wav"]
    for f in files:
        info = soundfile.info(f)
        assert (info.format, info.samplerate, info.channels) == ("WAV", SR, 2 if stereo else 1)
        assert abs(info.frames - 0.5 * SR) <= HOP
        audio, _ = soundfile.read(f, always_2d=True)
        assert audio.std() > 0
    rows = records(stdout)
    assert [r["prompt"] for r in rows] == ["prompt a", "prompt b"]
    assert [Path(r["file"]).name for r in rows] == [f.name for f in files]
    assert all(abs(r["seconds"] - 0.5) < 0.03 for r in rows)
    assert recorded(out) == {r["name"]: r for r in rows}
    assert "pad_token_id" not in stderr and "bos_token_id" not in stderr  # transformers' warnings are silenced
    assert "wrote 2 file(s)" in stderr and "audio-s per wall-s" in stderr


def test_format_flac(capsys, tmp_path, tiny_mono_dir):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "x", *gen_args(tiny_mono_dir, out, "--format", "flac", duration="0.2"))
    assert code == 0, stderr
    assert [f.name for f in audio_files(out)] == ["000_x.flac"]
    assert soundfile.info(out / "000_x.flac").format == "FLAC"


def test_skip_existing_resumes_from_results(capsys, tmp_path, tiny_mono_dir, monkeypatch):
    out = tmp_path / "out"
    assert run(capsys, "one", "two", *gen_args(tiny_mono_dir, out, duration="0.2"))[0] == 0
    first = (out / "000_one.wav").read_bytes()
    (out / "001_two.wav").write_bytes(b"truncated")  # recorded, but not what was recorded: made again
    (out / "002_three.wav").write_bytes(b"unrecorded")  # no results line: never trusted
    (out / ".002_three.tmp-99-1.wav").write_bytes(b"half")  # a killed writer's temporary: removed
    code, stdout, stderr = run(capsys, "one", "two", "three", *gen_args(tiny_mono_dir, out, "--skip-existing",
                                                                         duration="0.2"))
    assert code == 0, stderr
    assert [r["prompt"] for r in records(stdout)] == ["two", "three"]
    assert "skipping 1" in stderr and "removed 1 unfinished temporary" in stderr
    assert (out / "000_one.wav").read_bytes() == first
    assert [soundfile.info(f).samplerate for f in audio_files(out)] == [SR] * 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # all done: nothing to generate, the model is not even loaded, still success
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", None)
    code, stdout, stderr = run(capsys, "one", "two", "three", *gen_args(tiny_mono_dir, out, "--skip-existing"))
    assert code == 0 and records(stdout) == [] and "nothing left to do" in stderr
    # without a flag, a folder with an earlier job's results is refused (before loading), naming both flags
    code, stdout, stderr = run(capsys, "one", "two", *gen_args(tiny_mono_dir, out, duration="0.2"))
    assert code == 2 and stdout == "" and "--skip-existing" in stderr and "--overwrite" in stderr
    code, _, stderr = run(capsys, "one", *gen_args(tiny_mono_dir, out, "--skip-existing", "--overwrite"))
    assert code == 2 and "exclude each other" in stderr
    monkeypatch.undo()
    # --overwrite starts over: results.jsonl is cleared first, so it describes exactly the files of this run
    code, stdout, stderr = run(capsys, "one", "two", *gen_args(tiny_mono_dir, out, "--overwrite", duration="0.2"))
    assert code == 0 and len(records(stdout)) == 2 and "--overwrite: cleared" in stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert set(OutputFolder(out).completed()) == {"000_one", "001_two"}


def test_prompts_file_and_unconditional(capsys, tmp_path, tiny_mono_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lofi beat\n\n   jazz piano  \n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "rock", "--prompts-file", str(prompts), "--unconditional", "1",
                               *gen_args(tiny_mono_dir, out, duration="0.2"))
    assert code == 0, stderr
    assert [r["prompt"] for r in records(stdout)] == ["rock", "lofi beat", "jazz piano", None]
    assert [f.name for f in audio_files(out)] == ["000_rock.wav", "001_lofi_beat.wav", "002_jazz_piano.wav",
                                                  "003_unconditional.wav"]


def test_unconditional_only(capsys, tmp_path, tiny_mono_dir):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "--unconditional", "1", *gen_args(tiny_mono_dir, out, duration="0.2"))
    assert code == 0, stderr
    assert [r["prompt"] for r in records(stdout)] == [None]
    assert [f.name for f in audio_files(out)] == ["000_unconditional.wav"]


@pytest.mark.parametrize("mode", [["--greedy", "--seed", "5"], ["--seed", "5"]], ids=["greedy", "sampled"])
def test_seed_is_deterministic(capsys, tmp_path, tiny_mono_dir, mode):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, stderr = run(capsys, "lofi", "jazz", *mode, *gen_args(tiny_mono_dir, out, duration="0.3"))
        assert code == 0, stderr
        assert [r["seed"] for r in records(stdout)] == [5, 6]  # prompt i uses seed + i
        outputs.append({f.name: f.read_bytes() for f in audio_files(out)})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


def test_different_seeds_differ(capsys, tmp_path, tiny_mono_dir):
    files = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        assert run(capsys, "lofi", "--seed", seed, *gen_args(tiny_mono_dir, out, duration="0.3"))[0] == 0
        files.append((out / "000_lofi.wav").read_bytes())
    assert files[0] != files[1]


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("argv", [
    ["generate", "x", "--duration", "abc"],
    ["generate", "x", "--format", "mp3"],
    ["generate", "x", "--unconditional", "two"],
    ["generate", "x", "--backend", "cuda"],
    ["generate", "x", "--linear-backend", "cublas"],
    ["generate", "x", "--no-such-flag"],
    ["bogus"],
    [],
], ids=["duration-not-number", "format", "unconditional-not-int", "backend", "linear-backend", "unknown-flag",
        "command", "empty"])
def test_argparse_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("extra,named", [
    (["--duration", "-1"], "duration"),
    (["--duration", "nan"], "duration"),
    (["--duration", "4000"], "3600"),
    (["--temperature", "0"], "temperature"),
    (["--top-k", "-1"], "top_k"),
    (["--top-p", "2"], "top_p"),
    (["--seed", "-1"], "seed"),
    (["--guidance-scale", "-1"], "guidance_scale"),
    (["--max-slots", "0"], "max_slots"),
    (["--max-duration", "0"], "max_duration_s"),
    (["--backend", "torch", "--linear-backend", "triton"], "linear_backend='triton' needs backend='triton'"),
    (["--duration", "20", "--max-duration", "10"], "over the limit of 10.00 s"),
    (["--duration", "3599", "--audio-prompt", "INTRO"], "+ 2.00 s of audio prompt is over the limit of 3600.00 s"),
    (["--extend-stride", "20"], "extend_stride must be in (0, 10.16) s"),  # the tiny model's window
    (["--extend-stride", "0.5", "--window", "0.5"], "extend_stride must be in (0, 0.50) s"),
    (["--window", "40"], "window_s"),
    (["--kv-cache-gib", "0"], "--kv-cache-gib"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--out", "FILE"], "is a file"),
    (["--out", "SONG"], "looks like a file name"),
    (["--workers", "2"], "--ray"),
    (["--dtype", "float64"], "dtype"),
    (["--unconditional", "-1"], "--unconditional"),
    (["--prompts-file", "MISSING"], "missing.txt"),
    (["--model", "MISSING"], "no-such-checkpoint"),
    (["--model", "BAD_CONFIG"], "config.json"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_values_exit_2_with_one_line(capsys, tmp_path, tiny_mono_dir, monkeypatch, extra, named):
    bad_config = tmp_path / "bad"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{oops")
    (tmp_path / "existing.txt").write_text("x")
    substitutes = {"MISSING": str(tmp_path / ("missing.txt" if "--prompts-file" in extra else "no-such-checkpoint")),
                   "BAD_CONFIG": str(bad_config), "FILE": str(tmp_path / "existing.txt"),
                   "SONG": str(tmp_path / "song.wav"), "INTRO": str(tmp_path / "intro.wav")}
    soundfile.write(tmp_path / "intro.wav", np.zeros(2 * 16000, np.float32), 16000)
    extra = [substitutes.get(a, a) for a in extra]
    args = gen_args(tiny_mono_dir, tmp_path / "out", duration="0.2")
    for flag in ("--duration", "--out", "--device"):
        if flag in extra:  # drop the default
            i = args.index(flag)
            args = args[:i] + args[i + 2:]
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", None)  # all refused before the model loads
    code, stdout, stderr = run(capsys, "x", *args, *extra)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgen: error: "), stderr
    assert named in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_prompts_is_an_error(capsys, tmp_path, tiny_mono_dir):
    code, _, stderr = run(capsys, *gen_args(tiny_mono_dir, tmp_path / "out"))
    assert code == 2 and stderr.strip().splitlines() == [
        "fastgen: error: give at least one prompt (or --prompts-file, --manifest, or --unconditional N)"]


# ----------------------------------------------------------------------------------------------- built-in model
def test_builtin_model_when_no_model_given(capsys, tmp_path, monkeypatch):
    builtin = tmp_path / "cache" / "fastgen" / "builtin-tiny-random"
    monkeypatch.setattr(fastgen.cli, "BUILTIN_DIR", builtin)
    out = tmp_path / "out"
    args = ["noise", "--out", str(out), "--duration", "0.2", "--device", "cpu", "--max-slots", "2"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert NOISE_WARNING in stderr and "RANDOM weights" in stderr
    assert (builtin / "config.json").is_file() and (builtin / "model.safetensors").is_file()
    assert sorted(p.name for p in builtin.parent.iterdir()) == ["builtin-tiny-random"]  # no staging left behind
    assert soundfile.info(out / "000_noise.wav").samplerate == SR
    # the second run reuses the built checkpoint
    stamp = (builtin / "model.safetensors").stat().st_mtime_ns
    code, _, stderr = run(capsys, *args, "--overwrite")
    assert code == 0 and NOISE_WARNING in stderr
    assert (builtin / "model.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_builtin_build_leaves_nothing_half_done(capsys, tmp_path, monkeypatch):
    import fastgen.tiny
    builtin = tmp_path / "cache" / "builtin-tiny-random"
    monkeypatch.setattr(fastgen.cli, "BUILTIN_DIR", builtin)
    real_build = fastgen.tiny.build_tiny_checkpoint

    def interrupted(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")  # transformers writes config.json before the weights
        raise KeyboardInterrupt

    monkeypatch.setattr(fastgen.tiny, "build_tiny_checkpoint", interrupted)
    args = ["noise", "--out", str(tmp_path / "out"), "--duration", "0.2", "--device", "cpu", "--max-slots", "2"]
    assert main(["generate", *args]) == 130  # interrupted: exit 130, no traceback
    assert "interrupted" in capsys.readouterr().err
    assert not (builtin / "config.json").exists()
    monkeypatch.setattr(fastgen.tiny, "build_tiny_checkpoint", real_build)
    code, _, stderr = run(capsys, *args)
    assert code == 0, stderr


# ----------------------------------------------------------------------------------------------- entry point
def test_console_script_entry_point():
    (script,) = entry_points(group="console_scripts", name="fastgen")
    assert script.value == "fastgen.cli:main"


def test_python_m_fastgen_cli(tmp_path, tiny_mono_dir):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "fastgen.cli", "generate", "--model", str(tiny_mono_dir),
                             "hello world", "--duration", "0.2", "--out", str(out), "--device", "cpu",
                             "--max-slots", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert soundfile.info(out / "000_hello_world.wav").samplerate == SR
    assert json.loads(result.stdout.strip().splitlines()[-1])["prompt"] == "hello world"
    bad = subprocess.run([sys.executable, "-m", "fastgen.cli", "generate", "x", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("fastgen: error: ")


REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fastgen.cli ...` as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "-m", "fastgen.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow  # three real runs (~30 s on 2 busy cores); test_skip_existing_resumes_from_results: the quick one
def test_a_rerun_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_mono_dir):
    """A rerun into a finished --out without a flag used to overwrite every file silently and append lines to
    results.jsonl that no longer matched the files: now it is refused, and --overwrite starts over cleanly."""
    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_mono_dir), "a", "b", "--duration", "0.2", "--out", str(out), "--device",
            "cpu", "--max-slots", "2"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli(*args)
    assert again.returncode == 2, again.stderr[-3000:]
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith(f"fastgen: error: --out {out} already holds results.jsonl from an earlier job (2 output")
    assert "--skip-existing" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    over = cli(*args, "--overwrite")
    assert over.returncode == 0, over.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in lines) == ["000_a", "001_b"]  # this run's lines only
    assert {r["seed"] for r in lines}.isdisjoint(r["seed"] for r in records(first.stdout))  # fresh random seeds
    assert set(OutputFolder(out).completed()) == {"000_a", "001_b"}  # every line matches its file


@pytest.mark.slow  # a real run on a pseudo-terminal: ~25 s on 2 busy cores (the Progress tests above are quick)
def test_a_terminal_without_width_gets_progress_lines_and_short_file_lines(tmp_path, tiny_mono_dir):
    """`fastgen generate` on a terminal that reports no width (stdout and stderr both): 'progress:' lines instead of a
    blank bar, and a short line per file instead of 700 characters of JSON (those are in results.jsonl)."""
    import select
    out = tmp_path / "out"
    master, terminal = _pty(0)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fastgen.cli", "generate", "--model", str(tiny_mono_dir), "a",
                                 "b", "--seed", "3", "--duration", "0.2", "--out", str(out), "--device", "cpu",
                                 "--max-slots", "2", "--progress-interval", "0"], stdout=terminal, stderr=terminal,
                                cwd=REPO, env={**env, "PYTHONWARNINGS": "ignore"})
        terminal.close()
        shown, deadline = b"", time.monotonic() + 300
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal has closed it
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(60) == 0, shown.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
    lines = shown.decode().splitlines()
    assert any(line.startswith("progress: ") for line in lines)
    assert not any(line.startswith("{") for line in lines) and not any(not line.strip() for line in lines)
    assert f"wrote {out / '000_a.wav'} (0.20 s, seed 3)" in lines and f"wrote {out / '001_b.wav'} (0.20 s, seed 4)" \
        in lines
    assert set(OutputFolder(out).completed()) == {"000_a", "001_b"}  # the JSON is in results.jsonl


def test_audio_prompt_is_continued(capsys, tmp_path, tiny_stereo_dir):
    """--audio-prompt: a mono 16 kHz file continued by a stereo model; the output holds prompt + continuation."""
    prompt_file = tmp_path / "prompt.wav"
    rng = np.random.default_rng(0)
    soundfile.write(prompt_file, (0.2 * rng.standard_normal(16000 // 5)).astype(np.float32), 16000)  # 0.2 s
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "continue this", *gen_args(tiny_stereo_dir, out, "--audio-prompt",
                                                             str(prompt_file), duration="0.3"))
    assert code == 0, stderr
    info = soundfile.info(out / "000_continue_this.wav")
    assert info.channels == 2 and abs(info.frames / SR - 0.5) <= 2 * HOP / SR
    assert recorded(out)["000_continue_this"]["audio_prompt"] == str(prompt_file)
    code, _, stderr = run(capsys, "x", *gen_args(tiny_stereo_dir, tmp_path / "o2", "--audio-prompt",
                                                 str(tmp_path / "missing.wav")))
    assert code == 2 and "fastgen: error:" in stderr


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
def test_compile_gives_the_same_files(capsys, tmp_path, tiny_mono_dir):
    outputs = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        code, _, stderr = run(capsys, "lofi", "jazz", "--greedy", "--dtype", "float32", *extra,  # bf16: rounding
                              *gen_args(tiny_mono_dir, out, duration="0.3"))                # differs when fused
        assert code == 0, stderr
        outputs.append({f.name: f.read_bytes() for f in audio_files(out)})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


# ----------------------------------------------------------------------------------------------- manifests
def test_manifest_job(capsys, tmp_path, tiny_mono_dir):
    prompt_file = tmp_path / "intro.wav"
    soundfile.write(prompt_file, np.zeros(3200, np.float32), 32000)  # 0.1 s
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "lofi", "name": "lofi", "num_samples": 2, "seed": 7, "duration": 0.2, "top_k": 5},
        {"prompt": None, "duration": 0.1},
        {"prompt": "go on", "audio_prompt": "intro.wav", "duration": 0.1, "do_sample": False},
    ]) + "\n")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "--manifest", str(manifest), *gen_args(tiny_mono_dir, out, duration="0.3"))
    assert code == 0, stderr
    assert [f.name for f in audio_files(out)] == ["001_unconditional.wav", "002_go_on.wav", "lofi-0.wav", "lofi-1.wav"]
    results = recorded(out)
    assert results == {r["name"]: r for r in records(stdout)}
    assert [results[f"lofi-{j}"]["seed"] for j in (0, 1)] == [7, 8]  # N variants: seed, seed + 1
    assert results["lofi-0"]["codes_sha256"] != results["lofi-1"]["codes_sha256"]
    params = results["lofi-0"]["params"]
    assert (params["top_k"], params["duration"], params["seed"], params["guidance_scale"]) == (5, 0.2, 7, 3.0)
    assert results["002_go_on"]["params"]["do_sample"] is False
    assert abs(results["002_go_on"]["seconds"] - 0.2) < 0.03  # prompt + continuation
    assert results["001_unconditional"]["prompt"] is None and results["lofi-0"]["model"] == str(tiny_mono_dir)
    assert {"queue_s", "total_s"} <= set(results["lofi-0"]["timings"])
    engine = results["lofi-0"]["engine"]  # dtype: bf16 on CPUs with native bf16; window: the tiny model's 508 positions
    assert engine == {"dtype": engine["dtype"], "quantization": None, "window_s": engine["window_s"], "device": "cpu"}
    assert engine["dtype"] in ("float32", "bfloat16") and 10 < engine["window_s"] < 10.2


def test_bad_manifest_line_fails_before_loading(capsys, tmp_path, tiny_mono_dir, monkeypatch):
    manifest = tmp_path / "jobs.jsonl"
    soundfile.write(tmp_path / "intro.wav", np.zeros(32000, np.float32), 32000)  # 1 s
    manifest.write_text('{"prompt": "ok", "duration": 0.2}\n'
                        '{"prompt": "long", "duration": 3599.5, "audio_prompt": "intro.wav"}\n')
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", None)
    code, _, stderr = run(capsys, "--manifest", str(manifest), *gen_args(tiny_mono_dir, tmp_path / "out"))
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert "jobs.jsonl line 2 (field 'duration')" in line and "limit of 3600.00 s" in line
    assert not (tmp_path / "out").exists()
    code, _, stderr = run(capsys, "--manifest", str(manifest), "extra prompt", *gen_args(tiny_mono_dir, tmp_path / "o"))
    assert code == 2 and "--manifest holds the whole job" in stderr


def test_a_manifest_with_three_bad_lines_names_all_three(capsys, tmp_path, tiny_mono_dir, monkeypatch):
    """Every bad line at once, each naming its line and field, the limits' findings included; nothing loads."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"prompt": "ok", "duration": 0.2}\n'
                        '{"prompt": "a", "top_k": "ten"}\n'
                        '# a comment\n'
                        '{"prompt": "b", "duration": 3700}\n'    # over the 3600 s any engine takes
                        '{"prompt": "c", "duration": 1, "extend_stride": 30}\n')  # over the tiny model's window
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", None)
    code, _, stderr = run(capsys, "--manifest", str(manifest), *gen_args(tiny_mono_dir, tmp_path / "out"))
    assert code == 2
    first, *lines = stderr.strip().splitlines()
    assert first == "fastgen: error: 3 problems in the job (nothing was generated):"
    assert [line.split(": ")[0].strip() for line in lines] == [
        f"{manifest} line 2 (field 'top_k')", f"{manifest} line 4 (field 'duration')",
        f"{manifest} line 5 (field 'extend_stride')"]
    assert not (tmp_path / "out").exists()


def test_cache_budget_is_an_option_and_max_slots_is_honoured_or_refused(capsys, tmp_path, tiny_mono_dir):
    args = gen_args(tiny_mono_dir, tmp_path / "out", duration="0.1")
    i = args.index("--max-slots")
    args = args[:i] + args[i + 2:]
    code, _, stderr = run(capsys, "x", *args, "--max-slots", "300", "--kv-cache-gib", "0.001")
    assert code == 2 and "KV-cache budget" in stderr.strip().splitlines()[-1]
    code, _, stderr = run(capsys, "x", *args, "--max-slots", "3", "--kv-cache-gib", "4", "--max-duration", "2")
    assert code == 0, stderr
    assert "3 concurrent slot(s), up to 2.00 s per request" in stderr


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_flag_has_help_and_a_default(command):
    parser = fastgen.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    missing = [action.option_strings or action.dest for action in sub.choices[command]._actions
               if action.dest != "help" and "(default: " not in (action.help or "")]
    assert missing == []


def test_help_states_the_default_duration(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert "29.92sformusicgen-small" in text and "5.04sforthebuilt-intinymodel" in text


def test_progress_in_audio_seconds(tmp_path):
    import io
    from types import SimpleNamespace

    from fastgen.batch.progress import Progress
    stream = SimpleNamespace(done=1, audio_seconds_done=3.0, audio_seconds_total=12.0)
    tty = io.StringIO()
    bar = Progress(4, 12.0, stream=tty, tty=True)
    bar.update(stream)
    bar.close()
    shown = tty.getvalue().split("\r")[-1]
    assert shown.startswith(" 25%|") and "| 3.0/12.0 audio-s, " in shown and " audio-s per wall-s, clips 1/4 [" in shown
    assert len(shown.rstrip("\n")) <= 80  # whole in an 80-column terminal
    assert "s/audio-s" not in tty.getvalue() and "] ," not in tty.getvalue()  # one unit; no stray comma
    log = io.StringIO()
    lines = Progress(4, 12.0, stream=log, tty=False, interval_s=0.0)
    lines.update(stream)
    assert log.getvalue().startswith("progress: 1/4 clips, 3.0/12.0 s of audio,") and "ETA" in log.getvalue()
    assert "audio-s per wall-s" in log.getvalue()


def _pty(columns: int):
    """A pseudo-terminal (master fd, slave file) that reports ``columns`` (0: no width, as some terminals do)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    return master, os.fdopen(slave, "w")


def _drain(master: int) -> str:
    import select
    data = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


@pytest.mark.parametrize("columns", [100, 0], ids=["terminal", "terminal-without-width"])
def test_progress_on_a_terminal_and_on_one_without_width(monkeypatch, columns):
    """A terminal that reports no width got a blank line from the bar: it gets progress lines instead."""
    from types import SimpleNamespace

    from fastgen.batch.progress import Progress
    monkeypatch.delenv("COLUMNS", raising=False)
    master, terminal = _pty(columns)
    try:
        progress = Progress(2, 4.0, stream=terminal, interval_s=0.0)
        progress.update(SimpleNamespace(done=1, audio_seconds_done=2.0, audio_seconds_total=4.0))
        progress.close()
        terminal.flush()
        shown = _drain(master)
    finally:
        terminal.close()
        os.close(master)
    if columns:
        assert "| 2.0/4.0 audio-s, " in shown and " audio-s per wall-s, clips 1/2 [" in shown, shown
    else:
        assert shown.startswith("progress: 1/2 clips, 2.0/4.0 s of audio"), repr(shown)


def test_files_are_a_short_line_on_a_terminal_and_json_otherwise(tmp_path, tiny_mono_dir):
    """stdout gets each file's results line (JSON) when it is a pipe or a file, or with --json; on a terminal a short
    line (the JSON is in results.jsonl)."""
    import io

    from fastgen.batch.manifest import items_from_prompts
    from fastgen.batch.run import JobSpec, run_job
    items = items_from_prompts(["a"], fastgen.SamplingParams(duration=0.1), seed=4)
    for json_records, terminal in ((None, True), (True, True), (None, False)):
        out = tmp_path / f"out-{json_records}-{terminal}"
        master, stdout = _pty(80) if terminal else (None, io.StringIO())
        try:
            spec = JobSpec(items=items, out=out, model=tiny_mono_dir, device="cpu", json_records=json_records,
                           engine_options={"max_slots": 1})
            assert run_job(spec, log=io.StringIO(), records=stdout) == 0
            stdout.flush()
            shown = _drain(master) if terminal else stdout.getvalue()
        finally:
            if terminal:
                stdout.close()
                os.close(master)
        (line,) = shown.strip().splitlines()
        if json_records or not terminal:
            assert json.loads(line) == recorded(out)["000_a"]
        else:
            assert line == f"wrote {out / '000_a.wav'} (0.10 s, seed 4)"


# ----------------------------------------------------------------------------------------------- long-form
def test_long_durations_slide_over_windows(capsys, tmp_path, tiny_mono_dir):
    """Outputs longer than the window (--window 0.5 s here, to stay quick) come out whole: --extend-stride from the
    command line, extend_stride from a manifest line, both recorded in results.jsonl."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "lofi", "name": "flag", "seed": 3},                           # --extend-stride 0.3
        {"prompt": "lofi", "name": "line", "seed": 3, "extend_stride": 0.2},     # its own
    ]) + "\n")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "--manifest", str(manifest), "--window", "0.5", "--extend-stride", "0.3",
                               *gen_args(tiny_mono_dir, out, duration="1.3"))
    assert code == 0, stderr
    assert "up to 300.00 s per request" in stderr  # the engine's long-form default, not the window
    for name in ("flag", "line"):
        info = soundfile.info(out / f"{name}.wav")
        assert info.frames == round(1.3 * 50) * HOP  # every frame of 2–5 windows, none twice
    results = recorded(out)
    assert results == {r["name"]: r for r in records(stdout)}
    assert results["flag"]["params"]["extend_stride"] == 0.3 and results["line"]["params"]["extend_stride"] == 0.2
    assert all(r["seconds"] == 1.3 and r["params"]["duration"] == 1.3 for r in results.values())
    # same prompt and seed: only the window plan differs, so the codes do too (from the second window on)
    assert results["flag"]["codes_sha256"] != results["line"]["codes_sha256"]


def test_a_job_longer_than_the_engine_default_raises_its_limit(capsys, tmp_path, tiny_mono_dir, monkeypatch):
    """max_duration_s: the engine's 300 s default, the job's longest output above it (audio prompt included), or
    --max-duration as given; decided (and checked) before the model loads."""
    loads = []

    def from_pretrained(model, **options):
        loads.append(options.get("max_duration_s"))
        raise fastgen.FastgenError("not loading in this test")
    monkeypatch.setattr(fastgen.MusicGen, "from_pretrained", from_pretrained)
    intro = tmp_path / "intro.wav"
    soundfile.write(intro, np.zeros(16000, np.float32), 16000)  # 1 s
    for extra in (["--duration", "8"], ["--duration", "400"], ["--duration", "400", "--audio-prompt", str(intro)],
                  ["--duration", "400", "--max-duration", "500"]):
        code, _, stderr = run(capsys, "x", *gen_args(tiny_mono_dir, tmp_path / "out"), *extra)  # last --duration wins
        assert code == 2 and "not loading in this test" in stderr
    assert loads == [None, 400.0, 401.0, 500.0]


_WITHOUT_SOUNDFILE = r'''
import sys

class Blocker:  # a machine without soundfile (the GPU machines have none)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "soundfile":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
sys.modules["soundfile"] = None
import fastgen
from fastgen.cli import main

def from_pretrained(*args, **kwargs):
    raise AssertionError("the model was loaded")
fastgen.MusicGen.from_pretrained = from_pretrained
sys.exit(main(sys.argv[1:]))
'''


def test_missing_soundfile_fails_before_loading(tmp_path, tiny_mono_dir):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _WITHOUT_SOUNDFILE, "generate", "x", "--format", "flac",
                           *gen_args(tiny_mono_dir, out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "fastgen: error: reading or writing audio files needs the soundfile package: pip install soundfile "
        "(or, in a fastgen checkout, pip install -e '.[audio]')"]
    assert not out.exists()


def test_files_are_the_python_apis_audio(capsys, tmp_path, tiny_mono_dir):
    """Same seed, same music across entry points: the CLI's file holds the samples the Python API returns."""
    code, _, stderr = run(capsys, "lofi", "--seed", "5", *gen_args(tiny_mono_dir, tmp_path / "cli", duration="0.6"))
    assert code == 0, stderr
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, device="cpu")
    audio = model.generate(["lofi"], fastgen.SamplingParams(duration=0.6, seed=5))[0].audio
    fastgen.audio.write_audio(tmp_path / "api.wav", audio, SR)
    assert audio_files(tmp_path / "cli")[0].read_bytes() == (tmp_path / "api.wav").read_bytes()
