"""What a job shows while it runs: a progress bar in seconds of audio on a terminal, ``progress:`` lines elsewhere
(and on a terminal that reports no width), one line per written file, in one unit throughout: audio-s per wall-s."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, TextIO

BAR_REFRESH_S = 0.2
# the rate in the unit of the lines and the summary (tqdm's own says "2.00s/audio-s" when slow); the bar shrinks to
# fit the line in the terminal's width (80 columns hold it with a bar of 7 for a job of under 100 clips)
BAR_FORMAT = ("{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} audio-s, {speed:.2f} audio-s per wall-s, clips {clips} "
              "[{elapsed}<{remaining}]")
FALLBACK_COLUMNS = 80  # a terminal forced on (tty=True) that reports no width


def terminal_columns(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to; 0 when it is no terminal, or a terminal that reports no width
    (then $COLUMNS, if set, is taken)."""
    try:
        if not stream.isatty():
            return 0
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
    return max(columns, 0)


class Progress:
    """Audio seconds generated: a tqdm bar on a terminal (clips done/total, audio-s per wall-s, ETA); otherwise, or
    on a terminal of no width, one ``progress:`` line every ``interval_s`` on ``stream``. ``tty``: force the bar
    (True) or the lines (False) instead of asking the stream."""

    def __init__(self, clips: int, audio_seconds: float, stream: TextIO | None = None, tty: bool | None = None,
                 interval_s: float = 5.0) -> None:
        self.clips, self.audio_seconds = clips, audio_seconds
        stream = stream or sys.stderr
        self.out, self.interval_s = stream, interval_s
        self.start = time.perf_counter()
        self._last = float("-inf")  # the first update prints
        self.done = 0
        self.bar = None
        columns = 0 if tty is False else terminal_columns(stream)
        if tty and not columns:
            columns = FALLBACK_COLUMNS
        if columns:
            # the size the terminal reports follows resizes (dynamic_ncols); one it does not report stays fixed
            dynamic = tty is None and _reports_size(stream)
            self.bar = _bar_class()(total=round(audio_seconds, 2), unit="audio-s", file=stream,
                                    dynamic_ncols=dynamic, ncols=None if dynamic else columns, bar_format=BAR_FORMAT,
                                    extra={"speed": 0.0, "clips": f"0/{clips}"})

    def update(self, stream: Any) -> None:
        """Called after every engine step (``stream``: a GenerationStream): cheap unless a refresh is due."""
        now = time.perf_counter()
        if now - self._last < (BAR_REFRESH_S if self.bar is not None else self.interval_s):
            return
        self._last = now
        self.done = stream.done
        seconds = stream.audio_seconds_done
        rate = seconds / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.total = round(stream.audio_seconds_total, 2)
            self.bar.n = round(seconds, 2)
            self.bar.extra = {"speed": rate, "clips": f"{stream.done}/{self.clips}"}
            self.bar.refresh()
            return
        left = max(0.0, stream.audio_seconds_total - seconds)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        print(f"progress: {stream.done}/{self.clips} clips, {seconds:.1f}/{stream.audio_seconds_total:.1f} s of "
              f"audio, {rate:.2f} audio-s per wall-s, ETA {eta}", file=self.out, flush=True)

    def note(self, message: str, stream: TextIO | None = None) -> None:
        """A line on ``stream`` (default: the log) that leaves the bar intact."""
        if self.bar is not None:
            self.bar.clear()
        print(message, file=stream or self.out, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@functools.lru_cache(maxsize=None)
def _bar_class() -> type:
    from tqdm import tqdm  # (imported when a bar is shown)

    class Bar(tqdm):
        """tqdm with fields of ours (``extra``: speed, clips) for the bar format."""

        def __init__(self, *args: Any, extra: dict[str, Any], **kwargs: Any) -> None:
            self.extra = extra
            super().__init__(*args, **kwargs)

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, **self.extra}
    return Bar


def _reports_size(stream: TextIO) -> bool:
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def wants_json(records: TextIO, json_lines: bool | None) -> bool:
    """Each file's results line as JSON on ``records``: when asked (--json), else when it is no terminal (a pipe, a
    file: for programs); a person at a terminal gets a short line instead."""
    if json_lines is not None:
        return json_lines
    try:
        return not records.isatty()
    except (AttributeError, ValueError):
        return True


def record_line(record: dict[str, Any], json_lines: bool, out: str | os.PathLike = "") -> str:
    """What stdout gets for a written file: its results.jsonl line, or a short line for a person."""
    if json_lines:
        return json.dumps(record, ensure_ascii=False)
    path = os.path.join(str(out), record["file"]) if out else record["file"]
    return f"wrote {path} ({record['seconds']:.2f} s, seed {record['seed']})"
