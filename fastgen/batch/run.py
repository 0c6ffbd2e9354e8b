"""The batch command's flow, shared by ``fastgen generate`` and Python callers: check the whole job (items, output
folder, device, lengths against the checkpoint's limit) before loading anything, take the output folder, resume from
its results, load the model only if work is left, generate and write, stop cleanly on SIGINT/SIGTERM."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from fastgen.audio import check_can_write
from fastgen.batch.job import GRACE_S, JobResult, StopSignal, run_items
from fastgen.batch.manifest import JobItem, Problems, check_limits
from fastgen.batch.progress import Progress, record_line, wants_json
from fastgen.batch.writer import OutputFolder, check_out_dir
from fastgen.config import DEFAULT_MAX_DURATION_S, MAX_REQUEST_DURATION_S

EXIT_FAILED = 1
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """A signal arrived before generation started (while validating or loading): nothing was written."""

    def __init__(self, signum: int) -> None:
        super().__init__(SIGNAL_NAMES.get(signum, str(signum)))
        self.signum = signum


@dataclass
class JobSpec:
    items: list[JobItem]
    out: Path
    model: str | Path                          # checkpoint folder or hub id
    model_name: str = ""                       # recorded in results.jsonl (default: model)
    extension: str = ".wav"
    device: str | None = None                  # None: cuda when available
    dtype: str | None = None
    allow_pickle: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    skip_existing: bool = False                # resume: outputs recorded in OUT/results.jsonl are kept
    overwrite: bool = False                    # start over: OUT/results.jsonl is cleared first
    grace_s: float = GRACE_S
    resume_command: str = ""                   # printed when interrupted
    progress_interval_s: float = 5.0           # between "progress:" lines (no terminal)
    json_records: bool | None = None           # each file's results line as JSON on stdout (None: unless a terminal)
    ray_workers: int | None = None             # engines of a Ray Data run (fastgen.batch.ray_data)
    cpu_threads: int | None = None             # CPU: the decode's intra-op threads (None: the engine decides)
    problems: Problems | None = None           # errors found reading the job: reported with the limits' ones
    # an audiocraft export's T5 and EnCodec: text_encoder / audio_encoder of MusicGen.from_pretrained
    encoders: dict[str, str] = field(default_factory=dict)


def check_device(device: str | None) -> str:
    """A one-line error for a device torch cannot use; the default is cuda when available."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: fastgen runs on cpu or cuda, not {parsed.type}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA device is available here (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")  # what MusicGen.from_pretrained accepts


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


# runs a job's validated items (the caller holds the lock on spec.out): (items, spec, model name, device, log,
# records) → JobResult; fastgen.batch.ray_data.execute_on_ray is one, chosen by its callers (this module imports no Ray)
Executor = Callable[[list[JobItem], "JobSpec", str, str, TextIO, TextIO], JobResult]


def run_job(spec: JobSpec, log: TextIO | None = None, records: TextIO | None = None,
            execute: Executor | None = None) -> int:
    """Run the job here, or through ``execute``; returns the exit status (0 done, 1 some outputs failed,
    128 + signal when interrupted)."""
    log, records = log or sys.stderr, records or sys.stdout
    with _signals() as stop:
        device = check_device(spec.device)
        check_dtype(spec.dtype)
        check_out_dir(spec.out)
        check_can_write(spec.extension)  # (soundfile is imported lazily: find out now, not after generating)
        spec = _sized_for(spec)
        folder = OutputFolder(spec.out, spec.extension)
        with folder:
            claim_folder(folder, spec.skip_existing, spec.overwrite, log)
            removed = folder.remove_temporaries()
            if removed:
                print(f"removed {removed} unfinished temporary file(s) from an interrupted run", file=log)
            items = spec.items
            if spec.skip_existing:
                done = folder.completed()
                items = [i for i in items if not (i.name in done and done[i.name].get("prompt") == i.prompt)]
                if len(items) < len(spec.items):
                    print(f"skipping {len(spec.items) - len(items)} output(s) already in {folder.results_path}",
                          file=log)
            if not items:
                print(f"nothing left to do: all {len(spec.items)} output(s) are recorded in {folder.results_path}",
                      file=log)
                return 0
            name = spec.model_name or str(spec.model)
            if execute is not None:
                result = execute(items, spec, name, device, log, records)
            else:
                result = _run_local(spec, items, device, name, stop, log, records)
    return _report(spec, result, stop, log)


def check_rerun_flags(skip_existing: bool, overwrite: bool) -> None:
    if skip_existing and overwrite:
        raise ValueError("--skip-existing (resume the job in --out) and --overwrite (start it over) exclude each "
                         "other; give one")


def claim_folder(folder: OutputFolder, skip_existing: bool, overwrite: bool, log: TextIO) -> None:
    """Reruns are safe (the folder is locked by this job): a folder holding an earlier job's results.jsonl is resumed
    (skip_existing), started over (overwrite: results.jsonl cleared first, so it never describes files that are
    replaced or gone), or refused, naming both flags."""
    check_rerun_flags(skip_existing, overwrite)
    recorded = folder.recorded_lines()
    if not recorded or skip_existing:
        return
    if not overwrite:
        raise ValueError(f"--out {folder.path} already holds {folder.results_path.name} from an earlier job "
                         f"({recorded} output(s) recorded): add --skip-existing to resume it (recorded files are "
                         "kept) or --overwrite to start over (results.jsonl is cleared first), or choose another --out")
    folder.clear_results()
    print(f"--overwrite: cleared {folder.results_path} ({recorded} line(s) of an earlier job); its files are "
          "replaced as this job writes its own", file=log, flush=True)


def _sized_for(spec: JobSpec) -> JobSpec:
    """Check every item against the engine's limits before loading anything. Without a max_duration_s of the user's,
    the engine is made to accept the job's longest item (its default, raised up to MAX_REQUEST_DURATION_S)."""
    from fastgen.api import MusicGen
    options = spec.engine_options
    given = options.get("max_duration_s")
    problems = spec.problems if spec.problems is not None else Problems()
    try:
        info = MusicGen.inspect(spec.model, given or MAX_REQUEST_DURATION_S, window_s=options.get("window_s"),
                                **spec.encoders)
    except Exception as exc:  # a bad --model: said alone, or beside the job's own problems
        if not problems:
            raise
        problems.add(str(exc))
        raise problems.error() from None
    longest = check_limits(spec.items, info, problems)
    problems.raise_if_any()
    if given is not None or longest <= DEFAULT_MAX_DURATION_S:
        return spec
    return dataclasses.replace(spec, engine_options={**options, "max_duration_s": longest})


def _run_local(spec: JobSpec, items: list[JobItem], device: str, name: str, stop: "_Stop", log: TextIO,
               records: TextIO) -> JobResult:
    import torch

    from fastgen.api import MusicGen
    options = spec.engine_options
    compiling = " and compiling the decode step (a one-off of tens of seconds; cached afterwards)" \
        if options.get("compile_step") else ""
    warmup = " and capturing CUDA graphs" if device.startswith("cuda") and not options.get("enforce_eager") else ""
    print(f"loading {name} on {device}{compiling}{warmup}…", file=log, flush=True)
    started = time.perf_counter()
    model = MusicGen.from_pretrained(spec.model, device=device, dtype=spec.dtype, allow_pickle=spec.allow_pickle,
                                     cpu_threads=spec.cpu_threads, **spec.encoders, **options)
    wanted = options.get("max_slots")
    if wanted is not None and model.num_slots < wanted:
        raise ValueError(f"--max-slots {wanted}: the KV-cache budget holds only {model.num_slots} slot(s) of "
                         f"{model.max_duration_s:.1f} s; raise --kv-cache-gib or lower --max-duration")
    threads = ""
    if model.engine.device.type == "cpu":
        threads = f", {model.engine.cpu_threads or torch.get_num_threads()} CPU thread(s)"
    print(f"loaded in {time.perf_counter() - started:.1f} s: {model.num_slots} concurrent slot(s), up to "
          f"{model.max_duration_s:.2f} s per request{threads}", file=log, flush=True)
    progress = Progress(len(items), 0.0, stream=log, interval_s=spec.progress_interval_s)

    json_lines = wants_json(records, spec.json_records)

    def written(record: dict[str, Any]) -> None:
        progress.note(record_line(record, json_lines, spec.out), stream=records)

    def failed(item: JobItem, error: Exception) -> None:
        print(f"fastgen: {item.name} failed: {error}", file=log, flush=True)

    stop.generating = True
    try:
        return run_items(model, items, OutputFolder(spec.out, spec.extension), model_name=name, stop=stop.signal,
                         grace_s=spec.grace_s, on_step=progress.update, on_written=written, on_failed=failed,
                         on_note=progress.note)
    finally:
        stop.generating = False
        progress.close()


def _report(spec: JobSpec, result: JobResult, stop: "_Stop", log: TextIO) -> int:
    rate = result.audio_seconds / max(result.wall_s, 1e-9)
    print(f"wrote {len(result.written)} file(s), {result.audio_seconds:.1f} s of audio in {result.wall_s:.1f} s "
          f"({rate:.2f} audio-s per wall-s) to {spec.out}/", file=log)
    if stop.signal.signum is not None:
        signum = stop.signal.signum
        why = []
        if result.cut:
            why.append(f"{len(result.cut)} running output(s) {result.cut_reason or 'were cut'}")
        if result.not_started:
            why.append(f"{len(result.not_started)} not started")
        if result.past_grace_s > 0.5:  # a final step (its EnCodec) cannot be interrupted; finished files are kept
            why.append(f"the last finished ones were written {result.past_grace_s:.1f} s after --grace "
                       f"{spec.grace_s:g} s")
        rest = (f" Finished files are recorded in {spec.out / 'results.jsonl'}; unfinished ones left no file. Rerun "
                f"with --skip-existing to make the rest:\n  {spec.resume_command}" if result.left else "")
        print(f"interrupted by {SIGNAL_NAMES.get(signum, signum)}: {len(result.written)} output(s) written this "
              f"run, {len(result.left)} left{': ' + '; '.join(why) if why else ''}.{rest}", file=log)
        return 128 + signum
    if result.failed:
        print(f"{len(result.failed)} output(s) failed (not recorded; rerun with --skip-existing to retry them): "
              + ", ".join(list(result.failed)[:5]), file=log)
        return EXIT_FAILED
    return 0


class _Stop:
    def __init__(self) -> None:
        self.signal = StopSignal()
        self.generating = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.generating:  # between engine steps: stop admitting, finish what runs (see run_items)
            self.signal.request(signum)
        else:
            raise Interrupted(signum)


@contextlib.contextmanager
def _signals() -> Iterator[_Stop]:
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in SIGNAL_NAMES}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
