"""An output folder that can be trusted after any crash: audio files appear whole or not at all, ``results.jsonl``
says which are done, and one job at a time writes there.

A file is written to a dot-temporary beside its final name, flushed to disk, renamed into place (atomic on POSIX),
and only then recorded by one line appended to ``results.jsonl``. A file counts as done only when its line is there
and its size matches; a resume trusts nothing else and removes leftover temporaries."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fastgen.errors import FastgenError

RESULTS = "results.jsonl"
LOCK = ".fastgen.lock"
TMP_TAG = ".tmp-"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


class OutputFolderBusy(FastgenError):
    """Another process is writing a job into the same output folder."""


def check_out_dir(path: Path) -> None:
    """Refuse an --out that cannot be a folder, before any work."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; pass a folder for the audio files (e.g. --out out/)")
    if not path.exists() and path.suffix.lower() in AUDIO_SUFFIXES:
        raise ValueError(f"--out {path} looks like a file name; --out is the folder the files go to (e.g. --out "
                         "out/); name files with a manifest's \"name\" field")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot create or write in {parent}")


class OutputFolder:
    """Writes a job's files and results; ``lock()`` makes this process the folder's only job (workers of the same
    job, in other processes, write through their own OutputFolder without taking the lock)."""

    def __init__(self, path: Path, extension: str = ".wav") -> None:
        self.path = Path(path)
        self.extension = extension if extension.startswith(".") else f".{extension}"
        self._lock_fd: int | None = None
        self._append = threading.Lock()

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    # ------------------------------------------------------------------------------------------------ the lock
    def lock(self) -> "OutputFolder":
        """Take the folder (flock on a lock file: released by the kernel if this process dies, so a crash never
        leaves a stale lock). Raises OutputFolderBusy naming the holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_text(lock_path).strip() or "unknown"
                raise OutputFolderBusy(f"--out {self.path} is in use by another fastgen job (pid {holder}); wait "
                                       "for it to end or choose another folder") from None
            try:  # the holder we waited on may have unlinked the file: then our lock is on a dead inode
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.path / LOCK)  # before unlocking, so a waiter never holds a lock on a file we remove
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "OutputFolder":
        return self.lock()

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    # ------------------------------------------------------------------------------------------------ resume
    def remove_temporaries(self) -> int:
        """Delete files a killed writer left half-written (only the job holding the lock may call this)."""
        removed = 0
        if self.path.is_dir():
            for path in self.path.glob(f".*{TMP_TAG}*"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def recorded_lines(self) -> int:
        """How many lines results.jsonl holds (0 when there is none): an earlier job's record."""
        return sum(1 for line in _read_text(self.results_path).splitlines() if line.strip())

    def clear_results(self) -> None:
        """Start over: remove results.jsonl (durably), so it never holds lines for files that are replaced or gone.
        Only the job holding the lock may call this."""
        self.results_path.unlink(missing_ok=True)
        _fsync_path(self.path)

    def completed(self) -> dict[str, dict[str, Any]]:
        """name → results record, for outputs whose line is in results.jsonl and whose file is there at the
        recorded size (a later line for a name wins; a torn last line from a crash is ignored)."""
        records: dict[str, dict[str, Any]] = {}
        text = _read_text(self.results_path)
        for line in text.splitlines():
            try:
                record = json.loads(line)
                name, file, size = record["name"], record["file"], record["bytes"]
            except (ValueError, KeyError, TypeError):
                continue
            records[name] = record
        done = {}
        for name, record in records.items():
            path = self.path / Path(record["file"]).name
            try:
                if path.stat().st_size == record["bytes"]:
                    done[name] = record
            except OSError:
                pass
        return done

    # ------------------------------------------------------------------------------------------------ writing
    def write(self, name: str, audio: np.ndarray, sample_rate: int, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``name + extension`` atomically, then append ``record`` (completed with file and bytes) to
        results.jsonl. Returns the record as written."""
        from fastgen.audio import write_audio
        final = self.path / f"{name}{self.extension}"
        tmp = self.path / f".{name}{TMP_TAG}{os.getpid()}-{threading.get_ident()}{self.extension}"
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            write_audio(tmp, audio, sample_rate)
            _fsync_path(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_path(self.path)  # the rename itself
        record = {**record, "name": name, "file": final.name, "bytes": final.stat().st_size}
        self.append_result(record)
        return record

    def append_result(self, record: dict[str, Any]) -> None:
        """One line, one write(2) under an exclusive flock: workers in several processes append to the same file
        without interleaving; a torn line left by a crash is closed first so it cannot swallow the next one."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._append:
            fd = os.open(self.results_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the flock


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
