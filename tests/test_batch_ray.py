"""The Ray Data path on a real local cluster (2 CPUs, 2 workers, tiny model): the same files, seeds and codes as the
single-process run, item for item; results.jsonl written by both workers; resume through the dataset entry point."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile

ray = pytest.importorskip("ray")

from fastgen.batch import ray_data  # noqa: E402
from fastgen.batch.manifest import read_manifest  # noqa: E402
from fastgen.batch.run import JobSpec, run_job  # noqa: E402
from fastgen.batch.writer import OutputFolder  # noqa: E402

pytestmark = pytest.mark.slow  # see pyproject's markers: the quick tier leaves it out


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_equals_single_process_and_resumes(tmp_path, tiny_mono_dir, cluster, capsys):
    manifest = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "lofi", "name": "lofi", "num_samples": 2, "seed": 1, "duration": 0.3},
             {"prompt": None, "name": "silence", "seed": 5, "duration": 0.2},
             *({"prompt": f"clip {i}", "seed": 10 + i, "duration": 0.2 + 0.05 * i, "top_k": 3 + i}
               for i in range(4))]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    single, on_ray = tmp_path / "single", tmp_path / "ray"
    spec = JobSpec(items=read_manifest(manifest), out=single, model=tiny_mono_dir, device="cpu",
                   engine_options={"max_slots": 2})
    assert run_job(spec) == 0
    assert ray_data.generate(manifest, out=on_ray, model=tiny_mono_dir, workers=2, device="cpu", max_slots=2) == 0
    want, got = OutputFolder(single).completed(), OutputFolder(on_ray).completed()
    assert len(want) == 7 and set(got) == set(want)
    for name, record in want.items():
        assert (got[name]["seed"], got[name]["codes_sha256"]) == (record["seed"], record["codes_sha256"]), name
        # EnCodec runs with other threads and batch-mates there: float rounding may move a 16-bit sample by 1 LSB
        a, _ = soundfile.read(on_ray / got[name]["file"], dtype="int16")
        b, _ = soundfile.read(single / record["file"], dtype="int16")
        assert a.shape == b.shape and abs(a.astype(int) - b).max() <= 2, name
        assert got[name]["params"] == record["params"]
    assert "running on Ray Data: 2 worker(s)" in capsys.readouterr().err

    # the dataset entry point: rows are manifest objects; done ones are skipped, the new one written the same way
    rows = [{"name": "silence", "prompt": None, "seed": 5, "duration": 0.2},
            {"name": "new", "prompt": "fresh", "seed": 99, "duration": 0.2, "top_k": 4}]
    result = ray_data.generate(ray.data.from_items(rows), out=on_ray, model=tiny_mono_dir, workers=1, device="cpu",
                               skip_existing=True, max_slots=2)
    assert [r["name"] for r in result.written] == ["new"] and not result.failed
    done = OutputFolder(on_ray).completed()
    assert set(done) == set(want) | {"new"} and done["new"]["seed"] == 99 and done["new"]["params"]["top_k"] == 4
    assert not list(Path(on_ray).glob(".*tmp*"))
