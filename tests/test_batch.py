"""fastgen.batch without a model: manifests parsed and validated (line and field named), limits read from the
checkpoint's config alone, atomic writes recorded in results.jsonl, resume trusting only recorded files, the folder
lock refusing a second process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile

import fastgen
from fastgen.batch.manifest import ManifestError, Problems, check_limits, items_from_prompts, read_manifest
from fastgen.batch.writer import RESULTS, OutputFolder, OutputFolderBusy, check_out_dir


def write_manifest(path, *lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_fields_variants_and_seeds(tmp_path):
    (tmp_path / "intro.wav").write_bytes(b"")  # existence is checked here; decoding by check_limits
    manifest = write_manifest(tmp_path / "jobs.jsonl",
                              {"prompt": "lofi", "name": "lofi", "num_samples": 3, "seed": 10, "duration": 2},
                              "# a comment", "",
                              {"prompt": None, "audio_prompt": "intro.wav", "top_k": 7},
                              {"prompt": "jazz"})
    items = read_manifest(manifest, fastgen.SamplingParams(duration=4.0, temperature=0.5), seed=100)
    assert [i.name for i in items] == ["lofi-0", "lofi-1", "lofi-2", "001_unconditional", "002_jazz"]
    assert [i.params.seed for i in items] == [10, 11, 12, 103, 104]  # the line's seed, else --seed + position
    assert [i.params.duration for i in items] == [2, 2, 2, 4.0, 4.0]  # the line wins over the flag
    assert items[3].params.top_k == 7 and items[3].params.temperature == 0.5
    assert items[3].audio_prompt == tmp_path / "intro.wav" and items[3].prompt is None
    unseeded = read_manifest(write_manifest(tmp_path / "u.jsonl", {"prompt": "a", "num_samples": 2}))
    assert unseeded[1].params.seed == unseeded[0].params.seed + 1  # variants differ even without a seed
    assert [i.name for i in items_from_prompts(["a b", None], seed=5)] == ["000_a_b", "001_unconditional"]


@pytest.mark.parametrize("line,named", [
    ('{"prompt": "a", "tempreature": 1}', "unknown field 'tempreature'"),
    ('{"name": "x"}', "field 'prompt' is required"),
    ('{"prompt": 3}', "field 'prompt'"),
    ('{"prompt": "a", "top_k": -1}', "field 'top_k'"),
    ('{"prompt": "a", "duration": "long"}', "field 'duration'"),
    ('{"prompt": "a", "seed": -1}', "field 'seed'"),
    ('{"prompt": "a", "num_samples": 0}', "field 'num_samples'"),
    ('{"prompt": "a", "name": "../escape"}', "field 'name'"),
    ('{"prompt": "a", "audio_prompt": "missing.wav"}', "field 'audio_prompt'"),
    ('{"prompt": "a"', "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "a", "name": "A"}', "already used by"),  # case-insensitive duplicate of line 1's name
], ids=lambda v: v[:24])
def test_bad_manifest_line_is_one_error_naming_line_and_field(tmp_path, line, named):
    manifest = write_manifest(tmp_path / "jobs.jsonl", {"prompt": "ok", "name": "a"}, line)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert "line 2" in str(info.value) and named in str(info.value)


def test_every_bad_line_is_reported_at_once(tmp_path):
    """Fixing a long manifest takes one run, not one per mistake: every bad line, and every bad field of a line."""
    manifest = write_manifest(tmp_path / "jobs.jsonl",
                              {"prompt": "ok"},
                              {"prompt": "a", "top_k": "ten", "temperature": 0},   # two bad fields
                              {"prompt": "b", "tempo": 3},
                              {"prompt": "fine", "name": "x"},
                              '{"prompt": "c"',
                              {"prompt": "d", "name": "X"})                        # clashes with line 4
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    problems = info.value.problems
    assert len(problems) == 5 and str(info.value).startswith("5 problems in the job (nothing was generated):")
    assert [p.split(":")[0] for p in problems] == [f"{manifest} line {n}" + tail for n, tail in
                                                  ((2, " (field 'temperature')"), (2, " (field 'top_k')"), (3, ""),
                                                   (5, ""), (6, ""))]
    assert "'ten'" in problems[1] and "unknown field 'tempo'" in problems[2] and "not valid JSON" in problems[3]
    assert "already used by" in problems[4]
    assert all(p in str(info.value) for p in problems)


def test_problems_are_bounded_and_in_line_order(tmp_path):
    lines = [{"prompt": f"p{i}", "num_samples": 0} for i in range(120)]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_manifest(tmp_path / "jobs.jsonl", *lines))
    message = str(info.value)
    assert message.startswith("120 problems") and message.endswith("\n  … and 70 more")
    assert [int(p.split(" line ")[1].split(":")[0]) for p in info.value.problems] == list(range(1, 51))
    problems = Problems(limit=3)
    for line in (9, 2, 7, 1, 8):
        problems.add(f"line {line}", line)
    assert problems.error().problems == ["line 1", "line 2", "line 7"] and "… and 2 more" in str(problems.error())


def test_limits_report_every_output_over(tmp_path, tiny_mono_dir):
    manifest = write_manifest(tmp_path / "jobs.jsonl", {"prompt": "a", "duration": 2}, {"prompt": "b", "duration": 3},
                              {"prompt": "c", "duration": 0.5}, {"prompt": "d", "max_new_tokens": 2})
    with pytest.raises(ManifestError) as info:
        check_limits(read_manifest(manifest), fastgen.MusicGen.inspect(tiny_mono_dir, max_duration_s=1.0))
    assert [p.split(" (")[0] for p in info.value.problems] == [f"{manifest} line {n}" for n in (1, 2, 4)]


def test_duplicate_variant_names_are_refused(tmp_path):
    manifest = write_manifest(tmp_path / "j.jsonl", {"prompt": "a", "name": "x", "num_samples": 2},
                              {"prompt": "b", "name": "x-1"})
    with pytest.raises(ManifestError, match="x-1.*already used"):
        read_manifest(manifest)


def test_limits_come_from_the_config_without_loading(tmp_path, tiny_mono_dir):
    info = fastgen.MusicGen.inspect(tiny_mono_dir)
    assert info.max_duration_s == 300.0 and info.window_s == pytest.approx(10.16)  # long-form: past the window
    assert info.default_duration_s == pytest.approx(5.04)
    ok = items_from_prompts(["a"], fastgen.SamplingParams(duration=11.0))
    assert check_limits(ok, info) == 11.0  # the longest output's span
    with pytest.raises(ManifestError, match="over the limit of 300.00 s"):
        check_limits(items_from_prompts(["a"], fastgen.SamplingParams(duration=301.0)), info)
    with pytest.raises(ManifestError, match="limit of 2.00 s"):  # --max-duration shrinks the limit
        check_limits(ok, fastgen.MusicGen.inspect(tiny_mono_dir, max_duration_s=2.0))
    intro = tmp_path / "intro.wav"
    soundfile.write(intro, np.zeros(16000 * 3, np.float32), 16000)  # 3 s at another rate
    with_intro = items_from_prompts(["a"], fastgen.SamplingParams(duration=8.0), audio_prompt=intro)
    assert check_limits(with_intro, info) == 11.0
    with pytest.raises(ManifestError, match=r"\+ 3.00 s of audio prompt"):
        check_limits(with_intro, fastgen.MusicGen.inspect(tiny_mono_dir, max_duration_s=10.0))
    # extend_stride must fit the window the engine will have (the tiny model's 10.16 s, or window_s)
    assert check_limits(items_from_prompts(["a"], fastgen.SamplingParams(duration=4.0, extend_stride=10.0)), info)
    too_long = items_from_prompts(["a"], fastgen.SamplingParams(duration=4.0, extend_stride=1.0))
    with pytest.raises(ManifestError, match=r"\(field 'extend_stride'\): extend_stride must be in \(0, 0.50\) s"):
        check_limits(too_long, fastgen.MusicGen.inspect(tiny_mono_dir, window_s=0.5))


@pytest.mark.parametrize("options", [{}, {"max_duration_s": 0.5}, {"window_s": 1.0, "max_duration_s": 20.0},
                                     {"window_s": 29.0, "max_duration_s": 3000.0}], ids=str)
def test_inspect_applies_the_engines_own_limits(tiny_mono_model, options):
    """inspect (a job checked before loading) and Engine (requests checked when made) use one rule, FrameLimits."""
    engine = fastgen.Engine(tiny_mono_model, fastgen.EngineConfig(max_slots=1, **options))
    info = fastgen.MusicGen.inspect(tiny_mono_model.folder, options.get("max_duration_s"),
                                    window_s=options.get("window_s"))
    assert info.max_duration_s * info.frame_rate == engine.max_frames
    assert info.window_s * info.frame_rate == engine.window_frames
    longest = fastgen.SamplingParams(duration=info.max_duration_s)
    engine.make_request("a", longest)  # what inspect allows, the engine accepts …
    with pytest.raises(fastgen.RequestError, match="over the limit"):  # … and no more
        engine.make_request("a", fastgen.SamplingParams(duration=info.max_duration_s + 0.02))


@pytest.fixture(scope="module")
def tiny_mono_model(tiny_mono_dir):
    from fastgen.model.musicgen import MusicgenModel
    return MusicgenModel.load(tiny_mono_dir, dtype="float32")


def test_out_dir_checks(tmp_path):
    (tmp_path / "existing.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(tmp_path / "existing.txt")
    with pytest.raises(ValueError, match="looks like a file name"):
        check_out_dir(tmp_path / "song.wav")
    check_out_dir(tmp_path / "new" / "folder")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def tone(seconds=0.1, rate=32000):
    return (0.1 * np.sin(np.arange(int(seconds * rate)) / 5)).astype(np.float32)[None]


def test_write_is_atomic_and_recorded(tmp_path):
    folder = OutputFolder(tmp_path / "out", ".flac")
    record = folder.write("clip", tone(), 32000, {"prompt": "p", "seed": 1})
    assert record["file"] == "clip.flac" and record["bytes"] == (tmp_path / "out" / "clip.flac").stat().st_size
    assert soundfile.info(tmp_path / "out" / "clip.flac").format == "FLAC"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.flac", RESULTS]  # no temporary left
    (line,) = (tmp_path / "out" / RESULTS).read_text().splitlines()
    assert json.loads(line) == record


def test_resume_trusts_only_recorded_whole_files(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out)
    folder.write("good", tone(), 32000, {"prompt": "g"})
    folder.write("truncated", tone(), 32000, {"prompt": "t"})
    with open(out / "truncated.wav", "r+b") as f:
        f.truncate(100)  # recorded, but not the file that was recorded
    (out / "unrecorded.wav").write_bytes((out / "good.wav").read_bytes())  # a file with no line
    (out / ".x.tmp-123-4.wav").write_bytes(b"half")  # a killed writer's temporary
    with open(out / RESULTS, "ab") as f:
        f.write(b'{"name": "torn", "file": "to')  # a crash mid-line
    folder.write("after", tone(), 32000, {"prompt": "a"})  # must not be swallowed by the torn line
    assert set(folder.completed()) == {"good", "after"}
    with folder:
        assert folder.remove_temporaries() == 1
    assert not (out / ".x.tmp-123-4.wav").exists()


def test_lock_refuses_a_second_process_and_is_released(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from fastgen.batch.writer import OutputFolder
        folder = OutputFolder({str(out)!r}).lock()
        print("locked", flush=True)
        sys.stdin.readline()
        folder.unlock()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderBusy, match=f"pid {holder.pid}"):
            OutputFolder(out).lock()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    with OutputFolder(out):  # free again
        assert (out / ".fastgen.lock").read_text().strip() == str(os.getpid())
    assert not (out / ".fastgen.lock").exists()


def test_killed_holder_never_leaves_a_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from fastgen.batch.writer import OutputFolder
        OutputFolder({str(out)!r}).lock()
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()
        holder.wait(timeout=60)
        with OutputFolder(out):  # the kernel dropped the dead holder's flock
            pass
    finally:
        holder.kill()


def test_core_and_cli_never_import_ray():
    code = ("import sys, fastgen, fastgen.cli, fastgen.batch.run, fastgen.batch.job; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
