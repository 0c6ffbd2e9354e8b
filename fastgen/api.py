"""The user-facing entry point: ``fastgen.MusicGen.from_pretrained(...).generate(prompts, params)``, and
``generate_iter`` for results as they finish."""
from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from fastgen.audio import prepare_audio_prompt
from fastgen.config import EngineConfig, FrameLimits, ModelConfig
from fastgen.engine import longform
from fastgen.engine.engine import Engine
from fastgen.engine.threads import resolve_cpu_threads
from fastgen.engine.request import GenerationOutput, Request, RequestStatus
from fastgen.errors import RequestError, RequestFailed
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import BUILTIN_DEFAULTS, SamplingParams

# Requests queued ahead of the free slots, per slot: enough that admission never waits for the feeder (and T5 can
# run ahead on the stage worker), few enough that a job's size never shows in memory.
QUEUE_AHEAD_PER_SLOT = 2


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's config files say, read without loading any weights (for validating a job up front)."""
    folder: Path
    sample_rate: int
    frame_rate: int
    audio_channels: int
    max_duration_s: float        # longest request (prompt included) the engine will accept
    defaults: SamplingParams     # generation_config.json over fastgen's built-in defaults
    channel_codebooks: int       # the delay pattern's depth (max_new_tokens counts it)
    window_s: float              # long-form: the window a longer request slides over (extend_stride is below it)
    melody: bool = False         # a MusicGen-Melody checkpoint: requests may carry a melody

    def check_stride(self, extend_stride: float | None) -> None:
        """RequestError unless ``extend_stride`` (None: the default) fits this engine's window, as Engine checks it."""
        longform.stride_frames(extend_stride, round(self.window_s * self.frame_rate), self.frame_rate)

    @property
    def default_duration_s(self) -> float:
        """Seconds of new audio a request gets when it names no length."""
        if self.defaults.duration is not None:
            return self.defaults.duration
        return max(1, self.defaults.max_new_tokens + 1 - self.channel_codebooks) / self.frame_rate


class MusicGen:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # One call at a time drives the engine: calls from other threads wait their turn; a second iterator opened
        # in the thread that holds the first would wait on itself, so it is refused.
        self._busy = threading.Lock()
        self._owner: int | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
                        cpu_threads: int | None = None, text_encoder: str | Path | None = None,
                        audio_encoder: str | Path | None = None, **engine_options: Any) -> "MusicGen":
        """Load a MusicGen checkpoint folder (config.json, safetensors weights, tokenizer, generation_config.json)
        or a hub id. ``engine_options`` are EngineConfig fields (max_slots, backend, max_duration_s, …).
        ``cpu_threads``: on a CPU, the intra-op thread count the engine's decode runs with (default
        $FASTGEN_CPU_THREADS, else the calling thread's count: torch's default unless changed). An audiocraft export
        (a folder with state_dict.bin and compression_state_dict.bin: fastgen.model.audiocraft) loads too, its T5 and
        EnCodec from ``text_encoder`` / ``audio_encoder`` (Hugging Face folders or hub ids; default the models its
        files name: t5-base and facebook/encodec_32khz from the hub)."""
        config = EngineConfig(**engine_options)  # bad options fail before the weights are read
        cpu_threads = resolve_cpu_threads(cpu_threads)
        model = MusicgenModel.load(name_or_path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   quantization=config.quantization, compiled=config.compile_step,
                                   text_encoder=text_encoder, audio_encoder=audio_encoder)
        return cls(Engine(model, config, cpu_threads))

    @staticmethod
    def inspect(name_or_path: str | Path, max_duration_s: float | None = None, *,
                window_s: float | None = None, text_encoder: str | Path | None = None,
                audio_encoder: str | Path | None = None) -> CheckpointInfo:
        """Read a checkpoint's config.json and generation_config.json (no weights): its sample rate, channels,
        default sampling parameters, and the longest request and the window of an engine built with these
        ``max_duration_s`` and ``window_s`` (EngineConfig fields; the limits are the engine's own FrameLimits).
        An audiocraft export: its xp.cfg and its T5 and EnCodec configs (``text_encoder`` / ``audio_encoder`` as
        for from_pretrained)."""
        from fastgen.model import audiocraft
        from fastgen.model.loader import read_generation_config, resolve_checkpoint
        engine_config = EngineConfig(max_duration_s=max_duration_s, window_s=window_s)  # validates them
        folder = resolve_checkpoint(name_or_path)
        if audiocraft.is_export(folder):
            config, generation = audiocraft.read_config(folder, text_encoder=text_encoder,
                                                        audio_encoder=audio_encoder)
        else:
            config = ModelConfig.from_file(folder / "config.json")
            generation = read_generation_config(folder)
        limits = FrameLimits.of(config, engine_config)
        defaults = SamplingParams.from_generation_config(generation).with_defaults(BUILTIN_DEFAULTS)
        return CheckpointInfo(folder, config.sample_rate, config.frame_rate, config.decoder.audio_channels,
                              limits.request / config.frame_rate, defaults, config.decoder.channel_codebooks,
                              limits.window / config.frame_rate, melody=config.melody is not None)

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.engine.frame_rate

    @property
    def num_slots(self) -> int:
        return self.engine.num_slots

    @property
    def max_duration_s(self) -> float:
        """The longest request (audio prompt included) this engine accepts, in seconds."""
        return self.engine.max_frames / self.engine.frame_rate

    @property
    def defaults(self) -> SamplingParams:
        return self.engine.model.defaults

    def generate(self, prompts: Sequence[str | None], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 audio_prompts: Sequence[tuple[Any, int] | None] | None = None,
                 progress: bool = False, codes_prompts: Sequence[Any] | None = None,
                 melodies: Sequence[tuple[Any, int] | None] | None = None) -> list[GenerationOutput]:
        """Generate one output per prompt (None = unconditional), in order. Raises RequestError for invalid input
        before any work starts (``codes_prompts``, ``melodies``: see generate_iter). If requests fail while running,
        the others still finish and RequestFailed is raised at the end carrying ``.outputs`` (the list, None where a
        request failed) and ``.failures`` ({index: error})."""
        n = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, str) else 0
        bar = None
        if progress:
            from tqdm import tqdm  # the well-kept progress bar
            bar = tqdm(total=n, unit="clip", desc="generating")
        outputs: list[GenerationOutput | None] = [None] * n
        failures: dict[int, Exception] = {}
        try:
            for index, result in self.generate_iter(prompts, params, audio_prompts, on_error="yield",
                                                    codes_prompts=codes_prompts, melodies=melodies):
                if isinstance(result, Exception):
                    failures[index] = result
                else:
                    outputs[index] = result
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if failures:
            raise _failed(failures, len(outputs), outputs)
        return outputs  # type: ignore[return-value]

    def decode_codes(self, codes: Any) -> np.ndarray:
        """EnCodec: codes int [num_codebooks, frames] (GenerationOutput.codes' layout) → float32 audio
        [channels, frames · hop] at ``sample_rate``."""
        dec = self.engine.model.config.decoder
        checked = longform.as_codes(codes, dec.num_codebooks, dec.vocab_size, "codes")
        return self.engine.model.codec.decode([checked])[0]

    def encode_audio(self, waveform: Any, sample_rate: int) -> np.ndarray:
        """EnCodec: audio (numpy or torch, [samples] or [channels, samples], any rate; resampled and up/down-mixed as
        an audio prompt is) → int64 codes [num_codebooks, frames], what ``codes_prompts`` and ``decode_codes`` take."""
        dec = self.engine.model.config.decoder
        try:
            audio = prepare_audio_prompt(waveform, sample_rate, target_sample_rate=self.sample_rate,
                                         channels=dec.audio_channels, name="waveform")
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        return self.engine.model.codec.encode(audio).numpy().astype(np.int64)

    def generate_iter(self, prompts: Sequence[str | None],
                      params: SamplingParams | Sequence[SamplingParams] | None = None,
                      audio_prompts: Sequence[tuple[Any, int] | None] | None = None, *,
                      on_error: str = "raise",
                      on_step: Callable[["GenerationStream"], None] | None = None,
                      codes_prompts: Sequence[Any] | None = None,
                      melodies: Sequence[tuple[Any, int] | None] | None = None) -> "GenerationStream":
        """Yield ``(index, output)`` as each request finishes (completion order), holding only in-flight outputs.
        ``melodies``: on a MusicGen-Melody checkpoint, a (waveform, sample_rate) per prompt (None: no melody, the
        null chroma) or one for all; its chroma conditions the request (fastgen.model.melody).
        Every input is validated here, before any work (RequestError). A request that fails while running never
        stops the others: with ``on_error="raise"`` RequestFailed (with ``.failures``) is raised once the others have
        been yielded; with ``on_error="yield"`` its RequestFailed is yielded in place of the output.
        ``on_step(stream)`` runs after every engine step (progress). Closing the stream aborts what is left."""
        if on_error not in ("raise", "yield"):
            raise RequestError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise RequestError("prompts must be a list of strings or None, e.g. ['lofi beat']")
        n = len(prompts)
        per_prompt = _broadcast(params, n, "params")
        if isinstance(audio_prompts, tuple) and len(audio_prompts) == 2 and isinstance(audio_prompts[1], int):
            audio_prompts = [audio_prompts] * n  # one (waveform, sample_rate) continued by every prompt
        audio = _broadcast(audio_prompts, n, "audio_prompts") if audio_prompts is not None else [None] * n

        if isinstance(codes_prompts, (np.ndarray, torch.Tensor)):
            codes_prompts = [codes_prompts] * n  # one codes prompt (int64 [num_codebooks, frames]) for every prompt
        codes = _broadcast(codes_prompts, n, "codes_prompts") if codes_prompts is not None else [None] * n
        if isinstance(melodies, tuple) and len(melodies) == 2 and isinstance(melodies[1], int):
            melodies = [melodies] * n  # one (waveform, sample_rate) for every prompt
        melody = _broadcast(melodies, n, "melodies") if melodies is not None else [None] * n

        def build(i: int) -> Request:
            return self.engine.make_request(prompts[i], per_prompt[i], audio[i], name=f"prompts[{i}]",
                                            codes_prompt=codes[i], melody=melody[i])

        # Validate everything now. A request holding a resampled audio prompt is rebuilt when it is queued
        # instead of kept: N copies of a prompt's waveform would make memory grow with the job.
        built = [build(i) for i in range(n)]
        for i, request in enumerate(built):
            if request.audio_prompt is not None:
                built[i] = None  # type: ignore[call-overload]
        return GenerationStream(self, built, build, on_error, on_step)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this thread is already running a MusicGen.generate_iter on this model; finish or "
                               "close() it before starting another (one model serves one call at a time)")
        with self._busy:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


class GenerationStream:
    """The iterator generate_iter returns. Live counters for progress (``done``, ``failed``, ``total``,
    ``audio_seconds_done`` / ``audio_seconds_total``); ``stop_admitting()`` lets running requests finish while
    queued ones are dropped (an interrupted job); ``close()`` aborts everything still unfinished."""

    def __init__(self, model: MusicGen, built: list[Request | None], build: Callable[[int], Request],
                 on_error: str, on_step: Callable[["GenerationStream"], None] | None) -> None:
        self._model, self._engine = model, model.engine
        self._built, self._build = built, build
        self._on_error, self._on_step = on_error, on_step
        self.total = len(built)
        self.done = self.failed = 0
        self.not_started: list[int] = []   # indices dropped by stop_admitting, never queued
        self._next = 0                     # next index to queue
        self._live: dict[str, tuple[int, Request]] = {}  # request_id → (index, request), queued or running
        self._ready: deque[tuple[int, Any]] = deque()
        self._failures: dict[int, Exception] = {}
        self._finished_seconds = 0.0
        self.audio_seconds_total = sum(self._seconds(r) for r in built if r is not None)
        self._generator = self._run()

    def _seconds(self, request: Request) -> float:
        return request.resolved.new_frames / self._engine.frame_rate

    @property
    def audio_seconds_done(self) -> float:
        """Seconds of new audio generated so far: finished requests, plus the decoded share of running ones."""
        running = sum(self._seconds(r) * r.steps_done / max(1, r.steps_total) for _, r in self._live.values())
        return self._finished_seconds + running

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> tuple[int, Any]:
        return next(self._generator)

    def close(self) -> None:
        self._generator.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stop_admitting(self) -> list[int]:
        """Queue nothing more and drop what waits for a slot; running requests go on. Returns the dropped indices
        (with those never queued): the work left over."""
        for request_id, (index, request) in list(self._live.items()):
            if request.status == RequestStatus.WAITING and self._engine.abort(request_id):
                del self._live[request_id]
                self.not_started.append(index)
        self.not_started += range(self._next, self.total)
        self._next = self.total
        self.audio_seconds_total = self._finished_seconds + sum(self._seconds(r) for _, r in self._live.values())
        return sorted(self.not_started)

    def _feed(self) -> None:
        limit = self._engine.num_slots * (1 + QUEUE_AHEAD_PER_SLOT)
        while self._next < self.total and len(self._live) < limit:
            index, self._next = self._next, self._next + 1
            request = self._built[index] or self._build(index)
            self._built[index] = None  # the stream holds it while live, and no longer
            self._engine.enqueue(request)
            self._live[request.request_id] = (index, request)

    def _run(self) -> Iterator[tuple[int, Any]]:
        with self._model._exclusive():
            try:
                self._feed()
                while self._live or self._ready:
                    while self._ready:
                        yield self._ready.popleft()
                    if not self._live:
                        break
                    for request in self._engine.step():
                        entry = self._live.pop(request.request_id, None)
                        if entry is not None:
                            self._ended(*entry)
                    self._feed()
                    if self._on_step is not None:
                        self._on_step(self)
            finally:  # closed early, interrupted or failed: leave nothing of ours queued or holding a slot
                for request_id in list(self._live):
                    self._engine.abort(request_id)
                while self._engine.has_unfinished() and not self._engine.scheduler.has_unfinished():
                    self._engine.step()  # let EnCodec jobs of aborted requests drain from the stage worker
                self._live.clear()
        if self._failures and self._on_error == "raise":
            raise _failed(self._failures, self.total)

    def _ended(self, index: int, request: Request) -> None:
        if request.status == RequestStatus.FINISHED:
            self.done += 1
            self._finished_seconds += self._seconds(request)
            output, request.output = request.output, None  # ours to hand out; the engine keeps no copy
            self._ready.append((index, output))
            return
        self.failed += 1
        self.audio_seconds_total -= self._seconds(request)
        error = request.error if isinstance(request.error, Exception) else RequestFailed(
            f"prompts[{index}] {request.status.value}")
        self._failures[index] = error
        if self._on_error == "yield":
            self._ready.append((index, error))


def _failed(failures: dict[int, Exception], total: int,
            outputs: list[GenerationOutput | None] | None = None) -> RequestFailed:
    detail = "; ".join(f"prompts[{i}]: {e}" for i, e in sorted(failures.items())[:3])
    error = RequestFailed(f"{len(failures)} of {total} request(s) failed: {detail}")
    error.failures = dict(sorted(failures.items()))  # type: ignore[attr-defined]
    error.outputs = outputs  # type: ignore[attr-defined]
    return error


def _broadcast(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, SamplingParams):
        return [value] * n
    if not isinstance(value, Sequence) or len(value) != n:
        raise RequestError(f"{name} must be a single value or a list with one entry per prompt ({n})")
    return list(value)
