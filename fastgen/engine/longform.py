"""Long-form generation: a request longer than the model's window slides over it, as audiocraft does.

A window holds at most ``window`` frames (the trained 30 s). When a window is done (all its frames, every codebook),
the request keeps its last ``window − stride`` frames as the prompt of the next window (positions from 0 again, the
same text condition) and generates ``stride`` new frames after them; the frames before the kept ones leave the slot
for good. So window i covers frames [i·stride, i·stride + window) of the request (capped at its length), every window
after the first adds ``stride`` frames, and a slot never holds more than one window: a 5-minute request needs the KV
cache of a 30 s one. A prompt (audio or codes) longer than the window starts from its own last ``window − stride``
frames, as if it had been generated.

The runner does the re-prefill (ModelRunner.reprefill), the scheduler counts steps per window, and this module plans
the windows and their random streams, and checks codes given as a prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastgen.errors import RequestError
from fastgen.kernels.counter_hash import seed_key

DEFAULT_EXTEND_STRIDE_S = 18.0  # audiocraft's default: of a 30 s window, 12 s are kept as the next one's prompt
DEFAULT_STRIDE_SHARE = 0.6      # for a window shorter than 30 s: the same share of it (18 / 30)


@dataclass(frozen=True, slots=True)
class Window:
    offset: int         # the request's frame index of the slot's frame 0
    prompt_frames: int  # frames the window starts from (the prompt, or the previous window's kept frames)
    frames: int         # frames in the slot when the window is done (prompt included)
    first_step: int     # the request's decode steps done when the window starts
    last_step: int      # … and when it is done

    @property
    def end(self) -> int:
        """The request's frame index one past the window's last frame."""
        return self.offset + self.frames


def plan_windows(total_frames: int, prompt_frames: int, window_frames: int, stride_frames: int,
                 channel_codebooks: int) -> tuple[Window, ...]:
    """The windows of a request of ``total_frames`` (prompt included); one window when it fits. A window of f frames
    starting from p prompt frames takes f + channel_codebooks − 1 − p decode steps (the delay pattern's tail)."""
    kept = window_frames - stride_frames
    if total_frames <= window_frames or prompt_frames < window_frames:
        offset, start = 0, prompt_frames
    else:  # a prompt longer than the window: continue from its last kept frames
        offset, start = prompt_frames - kept, kept
    windows, step = [], 0
    while True:
        frames = min(window_frames, total_frames - offset)
        steps = frames + channel_codebooks - 1 - start
        windows.append(Window(offset, start, frames, step, step + steps))
        step += steps
        if offset + frames >= total_frames:
            return tuple(windows)
        offset, start = offset + stride_frames, kept


def stride_frames(extend_stride: float | None, window_frames: int, frame_rate: int) -> int:
    """``SamplingParams.extend_stride`` (seconds, None = default) → frames, checked against the window."""
    window_s = window_frames / frame_rate
    if extend_stride is None:
        extend_stride = min(DEFAULT_EXTEND_STRIDE_S, DEFAULT_STRIDE_SHARE * window_s)
    frames = round(extend_stride * frame_rate)
    if not 1 <= frames < window_frames:
        raise RequestError(f"extend_stride must be in (0, {window_s:.2f}) s, the window of this engine, at least one "
                           f"frame (1/{frame_rate} s) short of it; got {extend_stride!r}")
    return frames


def window_stream_seed(seed: int, window: int) -> int:
    """The 32-bit random-stream seed of a request's window. Positions restart at 0 in every window, so the kernels'
    counter (position, codebook) repeats: the window index goes into the stream seed instead. seed_key(s) is
    mix(mix(low 32 bits) ^ high 32 bits) with mix a bijection of 32-bit words, so flipping high bits by the window
    index gives every window of a request a different stream (window 0: the request's usual one)."""
    return seed_key(seed ^ (window << 32))


def as_codes(codes: Any, num_codebooks: int, vocab_size: int, name: str) -> torch.Tensor:
    """Validate user codes (numpy or torch, integer [num_codebooks, frames]: GenerationOutput.codes' layout, the delay
    pattern removed) → an int64 CPU tensor of one's own."""
    if isinstance(codes, np.ndarray):
        if codes.dtype.kind not in "iu":
            raise RequestError(f"{name} must hold integers (int64 codes), got dtype {codes.dtype}")
        codes = torch.from_numpy(codes.astype(np.int64))
    if not isinstance(codes, torch.Tensor):
        raise RequestError(f"{name} must be a numpy array or torch tensor of shape [num_codebooks, frames], "
                           f"got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise RequestError(f"{name} must hold integers (int64 codes), got dtype {codes.dtype}")
    if codes.dim() != 2 or codes.shape[0] != num_codebooks or codes.shape[1] < 1:
        raise RequestError(f"{name} must have shape [num_codebooks={num_codebooks}, frames ≥ 1], "
                           f"got {list(codes.shape)}")
    codes = codes.detach().to("cpu", torch.int64, copy=True).contiguous()
    if int(codes.min()) < 0 or int(codes.max()) >= vocab_size:
        raise RequestError(f"{name} values must be codebook entries in [0, {vocab_size - 1}], got values in "
                           f"[{int(codes.min())}, {int(codes.max())}]")
    return codes
