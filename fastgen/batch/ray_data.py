"""A batch job as a Ray Data pipeline: the job's rows as a dataset, a class-based ``map_batches`` UDF holding one
engine per worker (an actor pool: one GPU each on GPU machines, half a CPU each on CPU-only ones), each worker
writing its files and results.jsonl lines exactly as the single-process path does, so resume works the same.

Entry points: ``fastgen generate --ray [--workers N]``, and ``generate(manifest_or_dataset, model=..., out=...)``.
Ray is an optional extra (``pip install "fastgen[ray]"``); nothing else in fastgen imports this module."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import ray

from fastgen.batch.job import JobResult, run_items
from fastgen.batch.manifest import PARAM_FIELDS, JobItem, ManifestError, read_manifest
from fastgen.batch.progress import record_line, wants_json
from fastgen.batch.run import JobSpec, check_device, claim_folder, run_job
from fastgen.batch.writer import OutputFolder, check_out_dir

DEFAULT_BATCH = 16   # rows per batch when --max-slots is not given: the engine runs one batch at a time
CPU_PER_WORKER = 0.5  # two CPU workers on two cores must not starve each other waiting for a whole CPU


class GenerateBatch:
    """The UDF: one MusicGen per actor, loaded once; each batch is generated with its slots shared by the whole
    batch and every output written (atomic file, then its results.jsonl line) as soon as it finishes."""

    def __init__(self, model: str, out: str, extension: str, model_name: str, device: str, dtype: str | None,
                 allow_pickle: bool, engine_options: dict[str, Any], threads: int | None = None) -> None:
        import torch

        from fastgen.api import MusicGen
        if threads:
            torch.set_num_threads(threads)
        self.model = MusicGen.from_pretrained(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                              **engine_options)
        self.folder = OutputFolder(Path(out), extension)
        self.model_name = model_name

    def __call__(self, batch: Any) -> dict[str, list]:
        rows = batch.to_pylist()  # pyarrow: Python values, None kept (no NaN-for-missing as in numpy/pandas)
        columns: dict[str, list] = {"name": [], "status": [], "record": [], "error": []}

        def add(name: str, status: str, record: str = "", error: str = "") -> None:
            for key, value in zip(columns, (name, status, record, error)):
                columns[key].append(value)

        items: list[JobItem] = []
        for row in rows:
            try:
                items.append(JobItem.from_row(row, where=f"row {row.get('name')!r}"))
            except ManifestError as exc:  # a bad row fails alone
                add(str(row.get("name")), "invalid", error=str(exc))
        result = run_items(self.model, items, self.folder, model_name=self.model_name) if items else JobResult()
        for record in result.written:
            add(record["name"], "written", json.dumps(record))
        for name, error in result.failed.items():
            add(name, "failed", error=error)
        return columns


def execute_on_ray(items: list[JobItem], spec: JobSpec, model_name: str, device: str, log: TextIO,
                   records: TextIO) -> JobResult:
    """run_job's executor for Ray Data: spec.ray_workers engines (1 if unset)."""
    return run_on_ray(items, spec, model_name, workers=spec.ray_workers or 1, device=device, log=log, records=records)


def run_on_ray(items: list[JobItem], spec: JobSpec, model_name: str, *, workers: int, device: str,
               log: TextIO | None = None, records: TextIO | None = None, batch_size: int | None = None) -> JobResult:
    """Run validated items (the lock on spec.out is held by the caller) on ``workers`` engines."""
    dataset = ray.data.from_items([_full_row(item) for item in items])
    return _run_dataset(dataset, spec, model_name, workers=workers, device=device, log=log, records=records,
                        batch_size=batch_size)


def _full_row(item: JobItem) -> dict[str, Any]:
    """Every column in every row, so the dataset has one schema."""
    row = item.to_row()
    return {"name": row["name"], "prompt": row["prompt"], "audio_prompt": row["audio_prompt"],
            "melody": row.get("melody"), **{k: row.get(k) for k in PARAM_FIELDS}}


def _run_dataset(dataset: "ray.data.Dataset", spec: JobSpec, model_name: str, *, workers: int, device: str,
                 log: TextIO, records: TextIO, batch_size: int | None = None) -> JobResult:
    import time
    import logging
    log, records = log or sys.stderr, records or sys.stdout
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # RAY_ADDRESS joins a running cluster; otherwise a local one
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # fastgen prints its own lines; Ray's would repeat every 10 s
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpu = device.startswith("cuda")
    threads = None if gpu else spec.cpu_threads or max(1, (os.cpu_count() or 1) // workers)
    options = dict(spec.engine_options)
    batch_size = batch_size or options.get("max_slots") or DEFAULT_BATCH
    print(f"running on Ray Data: {workers} worker(s), one engine each on {'a GPU' if gpu else 'the CPU'}, "
          f"batches of {batch_size}", file=log, flush=True)
    # workers run in their own folders: hand them absolute paths (a hub id stays as it is)
    model = str(Path(spec.model).resolve()) if Path(spec.model).exists() else str(spec.model)
    options.update({key: str(Path(value).resolve()) if Path(value).exists() else str(value)  # from_pretrained's
                    for key, value in spec.encoders.items()})                                # text/audio_encoder
    start = time.perf_counter()
    outputs = dataset.map_batches(
        GenerateBatch, batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpu else 0, num_cpus=1 if gpu else CPU_PER_WORKER,
        fn_constructor_kwargs=dict(model=model, out=str(Path(spec.out).resolve()), extension=spec.extension,
                                   model_name=model_name, device="cuda" if gpu else "cpu", dtype=spec.dtype,
                                   allow_pickle=spec.allow_pickle, engine_options=options, threads=threads))
    result = JobResult()
    json_lines = wants_json(records, spec.json_records)
    for row in outputs.iter_rows():
        if row["status"] == "written":
            record = json.loads(row["record"])
            result.written.append(record)
            result.audio_seconds += record["seconds"]
            print(record_line(record, json_lines, spec.out), file=records, flush=True)
        else:
            result.failed[row["name"]] = row["error"]
            print(f"fastgen: {row['name']} {row['status']}: {row['error']}", file=log, flush=True)
    result.wall_s = time.perf_counter() - start
    return result


def generate(source: "str | Path | ray.data.Dataset", *, out: str | Path, model: str | Path, workers: int = 1,
             extension: str = ".wav", device: str | None = None, dtype: str | None = None,
             skip_existing: bool = False, overwrite: bool = False, batch_size: int | None = None,
             **engine_options: Any) -> JobResult | int:
    """Python entry point. ``source`` is a manifest path (validated whole, as the command line does; returns the
    exit status) or a Ray dataset whose rows are manifest objects for one output each, ``name`` required (checked
    by the workers; bad rows fail alone). Returns the JobResult for a dataset. An ``out`` holding an earlier job's
    results.jsonl needs ``skip_existing`` (resume) or ``overwrite`` (start over), as on the command line."""
    spec = JobSpec(items=[], out=Path(out), model=model, extension=extension, device=device, dtype=dtype,
                   engine_options=engine_options, skip_existing=skip_existing, overwrite=overwrite,
                   ray_workers=workers)
    if not isinstance(source, ray.data.Dataset):
        return run_job(replace(spec, items=read_manifest(Path(source))), execute=execute_on_ray)
    device = check_device(device)
    check_out_dir(spec.out)
    with OutputFolder(spec.out, extension) as folder:
        claim_folder(folder, skip_existing, overwrite, sys.stderr)
        folder.remove_temporaries()
        if skip_existing:
            done = set(folder.completed())
            source = source.filter(lambda row: row.get("name") not in done)
        return _run_dataset(source, spec, str(model), workers=workers, device=device, log=sys.stderr,
                            records=sys.stdout, batch_size=batch_size)
