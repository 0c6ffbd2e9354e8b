"""Batch jobs: what the job pipeline (manifest items → generate_iter → atomic file + results.jsonl line per output)
costs beside the bare in-process API, what the Ray Data path with 2 workers delivers, and peak memory of a job of
1,000 outputs against one of 100 (it must stay within 10 %: memory follows in-flight work, not job size).

    python bench/batch.py                      # tiny model, CPU: throughput, Ray, memory
    python bench/batch.py --skip-ray --skip-rss

Throughput is seconds of audio per wall second with the model loaded (the pipeline's own cost: writing files,
fsync, results lines); API and pipeline runs alternate, the best of --repeats each is kept. The Ray figure counts the
whole pipeline, workers' start and model load included, against the same job run in one process from scratch."""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, machine_name, write_result  # noqa: E402


def job_items(n: int, seconds: float):
    import fastgen
    from fastgen.batch.manifest import items_from_prompts
    return items_from_prompts([PROMPTS[i % len(PROMPTS)] for i in range(n)], fastgen.SamplingParams(duration=seconds),
                              seed=0)


def throughput(args, folder: Path, scratch: Path) -> dict:
    import fastgen
    from fastgen.batch.job import run_items
    from fastgen.batch.writer import OutputFolder
    model = fastgen.MusicGen.from_pretrained(folder, device="cpu", max_slots=args.slots)
    items = job_items(args.requests, args.seconds)
    prompts, params = [i.prompt for i in items], [i.params for i in items]
    audio = args.requests * args.seconds
    list(model.generate_iter(prompts[:args.slots], params[:args.slots]))  # warm-up
    api, pipeline = [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        for _ in model.generate_iter(prompts, params):
            pass
        api.append(audio / (time.perf_counter() - start))
        out = scratch / f"pipeline-{repeat}"
        start = time.perf_counter()
        result = run_items(model, items, OutputFolder(out), model_name="tiny")
        pipeline.append(audio / (time.perf_counter() - start))
        assert len(result.written) == args.requests
        shutil.rmtree(out)
    best_api, best_pipeline = max(api), max(pipeline)
    return {"api_audio_s_per_s": round(best_api, 2), "pipeline_audio_s_per_s": round(best_pipeline, 2),
            "pipeline_overhead": round(best_api / best_pipeline - 1, 4), "overhead_limit": 0.05,
            "runs_api": [round(x, 2) for x in api], "runs_pipeline": [round(x, 2) for x in pipeline]}


def ray_path(args, folder: Path, scratch: Path) -> dict:
    """The whole job from scratch: in one process (load + generate + write) vs on Ray with 2 workers."""
    import ray

    import fastgen
    from fastgen.batch.job import run_items
    from fastgen.batch.ray_data import run_on_ray
    from fastgen.batch.run import JobSpec
    from fastgen.batch.writer import OutputFolder
    items = job_items(args.requests, args.seconds)
    audio = args.requests * args.seconds
    start = time.perf_counter()
    model = fastgen.MusicGen.from_pretrained(folder, device="cpu", max_slots=args.slots)
    run_items(model, items, OutputFolder(scratch / "single"), model_name="tiny")
    single = audio / (time.perf_counter() - start)
    del model
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    spec = JobSpec(items=items, out=scratch / "ray", model=folder, engine_options={"max_slots": args.slots})
    start = time.perf_counter()
    result = run_on_ray(items, spec, "tiny", workers=2, device="cpu", records=open("/dev/null", "w"))
    on_ray = audio / (time.perf_counter() - start)
    ray.shutdown()
    assert len(result.written) == args.requests, result.failed
    return {"single_process_from_scratch_audio_s_per_s": round(single, 2),
            "ray_2_workers_audio_s_per_s": round(on_ray, 2), "ray_vs_single": round(on_ray / single, 3)}


def rss_child(n: int, seconds: float, slots: int, folder: Path, out: Path) -> None:
    """Run one job through the command's flow and print this process's peak RSS."""
    from fastgen.batch.run import JobSpec, run_job
    code = run_job(JobSpec(items=job_items(n, seconds), out=out, model=folder, device="cpu",
                           engine_options={"max_slots": slots}), records=open("/dev/null", "w"))
    assert code == 0
    print(json.dumps({"outputs": n, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def memory(args, folder: Path, scratch: Path) -> dict:
    peaks = {}
    for n in (100, 1000):
        out = scratch / f"rss-{n}"
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--seconds", str(args.rss_seconds),
                                 "--slots", str(args.slots), "--model", str(folder), "--out", str(out)],
                                capture_output=True, text=True, check=True)
        peaks[n] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        shutil.rmtree(out)
    held = 1000 * args.rss_seconds * 32000 * 4  # float32 mono audio a job holding every output would keep
    return {"clip_seconds": args.rss_seconds, "peak_rss_100_MiB": round(peaks[100] / 2**20, 1),
            "peak_rss_1000_MiB": round(peaks[1000] / 2**20, 1), "ratio": round(peaks[1000] / peaks[100], 4),
            "limit": 1.10, "audio_if_all_held_MiB": round(held / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-seconds", type=float, default=1.0)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = checkpoint(args.model, "float32")
    if args.rss_child:
        return rss_child(args.rss_child, args.seconds, args.slots, folder, args.out)
    fields = {"model": args.model, "requests": args.requests, "seconds_per_request": args.seconds,
              "max_slots": args.slots}
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-batch-") as tmp:
        scratch = Path(tmp)
        fields["throughput"] = throughput(args, folder, scratch)
        print(json.dumps(fields["throughput"]))
        if not args.skip_rss:
            fields["memory"] = memory(args, folder, scratch)
            print(json.dumps(fields["memory"]))
        if not args.skip_ray:
            fields["ray"] = ray_path(args, folder, scratch)
            print(json.dumps(fields["ray"]))
    write_result("batch", "cpu", machine_name("cpu"), None, fields)


if __name__ == "__main__":
    main()
