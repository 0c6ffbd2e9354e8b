"""Run a job's items on a loaded MusicGen: generate through ``generate_iter``, write each output the moment it
finishes (fastgen.batch.writer), report progress (fastgen.batch.progress), and stop cleanly when asked (a signal;
fastgen.batch.grace)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fastgen.api import GenerationStream, MusicGen
from fastgen.batch.grace import Grace
from fastgen.batch.manifest import JobItem
from fastgen.batch.progress import Progress  # noqa: F401  (where it used to live)
from fastgen.batch.writer import OutputFolder

GRACE_S = 10.0  # after a stop request, running requests get this long (from the signal) to finish and be written
WRITER_THREADS = 4
MAX_PENDING_WRITES = 32  # finished outputs waiting for the disk, at most


class Abandoned(Exception):
    """Raised through the stream to abort running requests when the grace period cannot or did not let them finish."""


@dataclass
class StopSignal:
    """Set from a signal handler; read between engine steps (a handler never interrupts a write)."""
    signum: int | None = None
    requested_at: float | None = None
    count: int = 0

    def request(self, signum: int) -> None:
        self.signum = self.signum or signum
        self.requested_at = self.requested_at or time.monotonic()
        self.count += 1


@dataclass
class JobResult:
    written: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)     # name → error
    left: list[str] = field(default_factory=list)            # names not generated (stopped): cut + not_started
    cut: list[str] = field(default_factory=list)             # running when the grace period cut them
    not_started: list[str] = field(default_factory=list)     # never admitted (stopped)
    cut_reason: str | None = None                            # why (fastgen.batch.grace)
    past_grace_s: float = 0.0                                # stopped: how long after the grace the job ended
    audio_seconds: float = 0.0
    wall_s: float = 0.0


def result_record(item: JobItem, output: Any, defaults: Any, model_name: str,
                  engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to know what a file is and to make it again (``engine``: engine_record's settings)."""
    params = dataclasses.replace(item.params.with_defaults(defaults), seed=output.seed)
    return {"name": item.name, "prompt": item.prompt,
            "audio_prompt": str(item.audio_prompt.resolve()) if item.audio_prompt is not None else None,
            **({"melody": str(item.melody.resolve())} if item.melody is not None else {}),
            "seed": output.seed, "params": dataclasses.asdict(params), "seconds": round(output.duration, 4),
            "sample_rate": output.sample_rate, "channels": int(output.audio.shape[0]),
            "codes_sha256": hashlib.sha256(output.codes.tobytes()).hexdigest(), "model": model_name,
            "timings": {k: round(v, 4) for k, v in output.timings.items()}, "engine": engine or {}}


def engine_record(model: Any) -> dict[str, Any]:
    """The engine settings a file's codes depend on beyond its parameters: the decoder's dtype and quantisation, and
    the long-form window (a request longer than it is made window by window)."""
    engine = model.engine
    decoder = engine.model.decoder
    return {"dtype": str(decoder.dtype).removeprefix("torch."), "quantization": decoder.quantization,
            "window_s": round(engine.window_frames / engine.frame_rate, 4), "device": str(engine.device)}


class _AudioPrompts(Sequence):
    """The items' audio prompts (or melodies), read from disk when the engine asks (a job's waveforms are never all
    in memory; a file shared by many items is read once while it is in use)."""

    def __init__(self, items: list[JobItem], field: str = "audio_prompt") -> None:
        self._paths = [getattr(item, field) for item in items]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index):  # type: ignore[override]
        path = self._paths[index]
        return None if path is None else _read(path)


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> tuple[Any, int]:
    from fastgen.audio import read_audio
    return read_audio(path)


def run_items(model: MusicGen, items: list[JobItem], folder: OutputFolder, *, model_name: str,
              stop: StopSignal | None = None, grace_s: float = GRACE_S,
              on_step: Callable[[GenerationStream], None] | None = None,
              on_written: Callable[[dict[str, Any]], None] | None = None,
              on_failed: Callable[[JobItem, Exception], None] | None = None,
              on_note: Callable[[str], None] | None = None) -> JobResult:
    """Generate ``items`` and write each file as it finishes. Returns what was written, what failed and, if
    ``stop`` was set, what was left: after it, nothing new is admitted and running requests get ``grace_s`` from the
    signal to finish (fastgen.batch.grace decides, between steps, when to cut them); ``on_note`` hears what happens."""
    result = JobResult()
    start = time.perf_counter()
    audio = _AudioPrompts(items) if any(item.audio_prompt is not None for item in items) else None
    melodies = _AudioPrompts(items, "melody") if any(item.melody is not None for item in items) else None
    grace = Grace(stop, grace_s, model.engine) if stop is not None else None
    taken = 0  # outputs (and errors) the loop below has taken from the stream

    def step(stream: GenerationStream) -> None:
        if grace is not None:
            grace.observe()
            if stop.signum is not None:
                if not grace.stopping:
                    stream.stop_admitting()
                    note = grace.announce()
                    if on_note is not None:
                        on_note(note)
                # cut only with no finished output waiting to be taken: those are written whatever happens
                if grace.cut_reason() is not None and stream.done + stream.failed == taken:
                    raise Abandoned
        if on_step is not None:
            on_step(stream)

    stream = model.generate_iter([item.prompt for item in items], [item.params for item in items], audio,
                                 on_error="yield", on_step=step, melodies=melodies)
    finished: set[int] = set()
    writers = _Writers(folder, result, on_written)
    settings = engine_record(model)
    try:
        with stream:
            for index, output in stream:
                taken += 1
                finished.add(index)
                item = items[index]
                if isinstance(output, Exception):
                    result.failed[item.name] = str(output)
                    if on_failed is not None:
                        on_failed(item, output)
                else:
                    writers.submit(item.name, output, result_record(item, output, model.defaults, model_name,
                                                                    settings))
                if grace is not None and grace.reason is not None and stream.done + stream.failed == taken:
                    raise Abandoned  # the last finished output is taken: cut the rest now, before another step
    except Abandoned:
        pass
    finally:
        writers.close()  # every finished output is written (and recorded) before we return, even when stopping
    not_started = set(stream.not_started)
    result.left = [item.name for i, item in enumerate(items) if i not in finished]
    result.not_started = [item.name for i, item in enumerate(items) if i in not_started and i not in finished]
    result.cut = [item.name for i, item in enumerate(items) if i not in finished and i not in not_started]
    result.cut_reason = grace.reason if grace is not None and result.cut else None
    if grace is not None and grace.stopping:
        result.past_grace_s = max(0.0, -grace.left_s())  # a last step's EnCodec, the last writes
    result.wall_s = time.perf_counter() - start
    return result


class _Writers:
    """Files are encoded, fsynced and recorded on a few threads while the engine keeps stepping (soundfile and
    fsync release the GIL; fsync latency would otherwise stall decoding). Pending outputs are bounded, so a slow
    disk holds the generator back instead of filling memory."""

    def __init__(self, folder: OutputFolder, result: JobResult,
                 on_written: Callable[[dict[str, Any]], None] | None) -> None:
        self.folder, self.result, self.on_written = folder, result, on_written
        self.pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="fastgen-writer")
        self.slots = threading.BoundedSemaphore(MAX_PENDING_WRITES)
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []

    def submit(self, name: str, output: Any, record: dict[str, Any]) -> None:
        if self.errors:
            raise self.errors[0]
        self.slots.acquire()
        self.pool.submit(self._write, name, output, record)

    def _write(self, name: str, output: Any, record: dict[str, Any]) -> None:
        try:
            record = self.folder.write(name, output.audio, output.sample_rate, record)
            with self.lock:
                self.result.written.append(record)
                self.result.audio_seconds += output.duration
                if self.on_written is not None:
                    self.on_written(record)
        except BaseException as exc:  # raised in the job's thread (next submit, or close)
            self.errors.append(exc)
        finally:
            self.slots.release()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.errors:
            raise self.errors[0]
