"""One generation request and its life cycle: WAITING → RUNNING → FINISHED | FAILED | ABORTED."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastgen.engine.longform import Window, plan_windows
from fastgen.sampling_params import ResolvedParams, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DECODING = "decoding"  # slot released, EnCodec turning its codes into audio
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.ABORTED)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    params: SamplingParams          # as given, defaults filled
    resolved: ResolvedParams
    text_ids: list[int] | None      # None: unconditional
    audio_prompt: np.ndarray | None  # [channels, samples] at the model's rate and channel count
    prompt_frames: int              # audio prompt frames (estimated at submission, exact after encoding)
    channel_codebooks: int
    window_frames: int = 0          # long-form (fastgen/engine/longform.py): the engine's window; 0 = the request's
    stride_frames: int = 0          # frames each window after the first adds
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    steps_done: int = 0
    prompt_codes: torch.Tensor | None = None  # [K, P] once encoded (given as such: a codes prompt)
    chroma: torch.Tensor | None = None  # melody model: the melody's one-hot chroma [frames, bins] (None: no melody)
    prefix_length: int = 0          # melody model: the slot's prefix positions before the audio (set at admission)
    windows: tuple[Window, ...] = ()  # planned by plan(); one unless the request is longer than the window
    window_index: int = 0
    done_codes: list[torch.Tensor] = field(default_factory=list)  # [K, f] CPU: frames that left the slot, in order
    text_pending: bool = False      # T5 running ahead on the stage worker; not admitted until it is done
    text_states: torch.Tensor | None = None  # [T, D] prefetched decoder-width text states
    text_ready: Any = None          # CUDA event the states are ready after (threaded stage worker on CUDA)
    error: Exception | None = None
    output: "GenerationOutput | None" = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_step_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.plan()

    def plan(self) -> None:
        """(Re)plan the windows, e.g. once the audio prompt's exact length is known."""
        self.windows = plan_windows(self.total_frames, self.prompt_frames, self.window_frames or self.total_frames,
                                    self.stride_frames, self.channel_codebooks)

    @property
    def total_frames(self) -> int:
        return self.prompt_frames + self.resolved.new_frames

    @property
    def window(self) -> Window:
        return self.windows[self.window_index]

    @property
    def steps_total(self) -> int:
        """Decode steps over all windows: in each, every delayed position after its prompt's, up to the last
        codebook's last frame."""
        return self.windows[-1].last_step

    @property
    def complete_frames(self) -> int:
        """How many of the request's frames (counted from its first, across windows) have every codebook generated.
        In the current window codebook c lags the first by c positions, so a step completes a frame only after the
        delay pattern's K − 1 steps; the window's prompt frames (the previous window's kept ones) are complete from
        its start, so the count never goes back at a window boundary."""
        window = self.window
        generated = window.prompt_frames + self.steps_done - window.first_step - (self.channel_codebooks - 1)
        return window.offset + min(window.frames, max(window.prompt_frames, generated))

    @property
    def position(self) -> int:
        """Delayed-sequence position of the next input token in the current window (host mirror of the device
        counter)."""
        return self.window.prompt_frames + self.steps_done - self.window.first_step


@dataclass
class GenerationOutput:
    """The result of one request (the items MusicGen.generate returns)."""
    request_id: str
    prompt: str | None
    audio: np.ndarray        # float32 [channels, samples]
    sample_rate: int
    codes: np.ndarray        # int64 [num_codebooks, frames], delay pattern removed; an audio prompt's codes first
    seed: int
    prompt_frames: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.audio.shape[-1] / self.sample_rate
