"""A batch job: the list of outputs to make, parsed from a manifest (JSON lines) or from plain prompts, and checked
as a whole against the checkpoint's limits before any model is loaded.

Manifest: one JSON object per line::

    {"prompt": "lofi beat", "name": "lofi", "duration": 8, "num_samples": 3, "seed": 10}
    {"prompt": null, "audio_prompt": "intros/a.wav", "duration": 5, "temperature": 0.9}

``prompt`` (string, or null for unconditional) is required; ``name`` (file stem; default ``NNN_slug``),
``audio_prompt`` (path relative to the manifest), ``melody`` (likewise: MusicGen-Melody checkpoints),
``num_samples`` (N variants: seeds seed, seed+1, …, files name-0, name-1, …) and every ``SamplingParams`` field are
optional. Blank lines and lines starting with ``#`` are
skipped."""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fastgen.api import CheckpointInfo
from fastgen.audio import safe_filename
from fastgen.config import MAX_REQUEST_DURATION_S
from fastgen.errors import RequestError
from fastgen.sampling_params import SEED_MAX, SamplingParams

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
JOB_FIELDS = ("prompt", "name", "audio_prompt", "melody", "num_samples")
MAX_SAMPLES_PER_LINE = 10_000
# Portable file stems: no separators, no leading dot (our temporaries and lock are dot files), no trailing dot.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,149}$")


MAX_PROBLEMS = 50  # a job's errors reported at once, the first by line; then "… and N more"


class ManifestError(RequestError):
    """A job cannot run as given; the message names the line and the field (``problems``: every error found, each a
    line of the message, when there are several)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class Problems:
    """Collects a job's errors so that all of them are reported at once (the first MAX_PROBLEMS by line, and how
    many more), instead of one per run."""

    def __init__(self, limit: int = MAX_PROBLEMS) -> None:
        self.limit, self.count = limit, 0
        self._kept: list[tuple[int, int, str]] = []  # a max-heap (negated) of the ``limit`` first by line

    def add(self, message: str, line: int = 0) -> None:
        """``line``: where in the job (0: the job as a whole, listed first)."""
        self.count += 1
        entry = (-line, -self.count, message)
        if len(self._kept) < self.limit:
            heapq.heappush(self._kept, entry)
        elif entry > self._kept[0]:
            heapq.heapreplace(self._kept, entry)

    def add_error(self, error: ManifestError, line: int = 0) -> None:
        for message in error.problems:
            self.add(message, line)

    def __bool__(self) -> bool:
        return self.count > 0

    def error(self) -> ManifestError:
        found = [message for _, _, message in sorted(self._kept, reverse=True)]
        if self.count == 1:
            return ManifestError(found[0])
        more = f"\n  … and {self.count - len(found)} more" if self.count > len(found) else ""
        return ManifestError(f"{self.count} problems in the job (nothing was generated):\n  " + "\n  ".join(found)
                             + more, found)

    def raise_if_any(self) -> None:
        if self.count:
            raise self.error()


@dataclass(frozen=True)
class JobItem:
    """One output file of a job."""
    name: str                     # file stem, unique in the job
    prompt: str | None
    params: SamplingParams        # seed always set
    audio_prompt: Path | None = None
    source: str = ""              # where it came from, for messages ("jobs.jsonl line 3")
    melody: Path | None = None    # a melody file (MusicGen-Melody checkpoints)

    def to_row(self) -> dict[str, Any]:
        """A flat JSON-friendly dict (a manifest line for exactly this output): Ray dataset rows, results."""
        row = {"name": self.name, "prompt": self.prompt,
               "audio_prompt": str(self.audio_prompt.resolve()) if self.audio_prompt is not None else None}
        if self.melody is not None:
            row["melody"] = str(self.melody.resolve())
        row.update({k: v for k, v in dataclasses.asdict(self.params).items() if v is not None})
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "row") -> "JobItem":
        """The inverse of to_row; validates like a manifest line (num_samples not allowed: one row, one output)."""
        row = {k: _plain(v) for k, v in row.items() if _plain(v) is not None or k == "prompt"}
        if "name" not in row:
            raise ManifestError(f"{where}: field 'name' is required in a dataset row (the output's file stem)")
        (item,) = _expand(row, where, base=Path("."), index=0, next_seed=None, allow_samples=False)
        return item


def _plain(value: Any) -> Any:
    """numpy scalars (as Ray hands rows over) to Python values; NaN (a missing column) to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def read_manifest(path: Path, defaults: SamplingParams = SamplingParams(), seed: int | None = None,
                  problems: Problems | None = None) -> list[JobItem]:
    """Parse a manifest. ``defaults`` (the command line's sampling flags) fill fields a line leaves out; ``seed``
    gives outputs without their own seed seed, seed+1, … in job order (None: fresh random seeds). Every bad line is
    reported, not just the first: ManifestError with all of them, or, given ``problems``, they are added there and
    the good lines' items returned (to be checked further before one error names everything)."""
    own = problems is None
    problems = Problems() if own else problems
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc})") from None
    items: list[JobItem] = []
    index = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {number}"
        index += 1
        try:
            record = json.loads(line)
        except ValueError as exc:
            problems.add(f"{where}: not valid JSON ({exc})", number)
            continue
        if not isinstance(record, dict):
            problems.add(f"{where}: expected a JSON object like {{\"prompt\": \"lofi beat\"}}, got "
                         f"{type(record).__name__}", number)
            continue
        record = {k: v for k, v in record.items() if v is not None or k == "prompt"}
        for key, value in defaults_dict(defaults).items():
            record.setdefault(key, value)
        next_seed = None if seed is None else seed + len(items)
        try:
            items += _expand(record, where, base=Path(path).parent, index=index - 1, next_seed=next_seed,
                             line=number)
        except ManifestError as exc:
            problems.add_error(exc, number)
    if not items and not problems:
        raise ManifestError(f"{path}: the manifest has no jobs (one JSON object per line)")
    check_names(items, problems)
    if own:
        problems.raise_if_any()
    return items


def items_from_prompts(prompts: Iterable[str | None], defaults: SamplingParams = SamplingParams(),
                       seed: int | None = None, audio_prompt: Path | None = None,
                       melody: Path | None = None) -> list[JobItem]:
    """Plain prompts (positional, --prompts-file, --unconditional): files NNN_slug, prompt i seeded seed + i."""
    items: list[JobItem] = []
    problems = Problems()
    for i, prompt in enumerate(prompts):
        record = {"prompt": prompt, **defaults_dict(defaults)}
        if audio_prompt is not None:
            record["audio_prompt"] = str(audio_prompt)
        if melody is not None:
            record["melody"] = str(melody)
        try:
            items += _expand(record, f"prompt {i + 1}", base=Path("."), index=i,
                             next_seed=None if seed is None else seed + i)
        except ManifestError as exc:
            problems.add_error(exc, i + 1)
    check_names(items, problems)
    problems.raise_if_any()
    return items


def defaults_dict(params: SamplingParams) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(params).items() if v is not None}


def _expand(record: dict[str, Any], where: str, *, base: Path, index: int, next_seed: int | None,
            allow_samples: bool = True, line: int = 0) -> list[JobItem]:
    """One line's outputs; ManifestError naming every bad field of the line."""
    errors: list[str] = []
    unknown = [k for k in record if k not in JOB_FIELDS and k not in PARAM_FIELDS]
    if unknown:
        errors.append(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(repr(k) for k in unknown)}; allowed: {', '.join(JOB_FIELDS + PARAM_FIELDS)}")
    prompt = record.get("prompt")
    if "prompt" not in record:
        errors.append(f"{where}: field 'prompt' is required (a string, or null for unconditional)")
    elif prompt is not None and not isinstance(prompt, str):
        errors.append(f"{where}: field 'prompt' must be a string or null, got {type(prompt).__name__}")
        prompt = None
    name = record.get("name")
    if name is None:
        name = safe_filename(prompt, index, extension="")
    elif not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        errors.append(f"{where}: field 'name' must be a file stem of 1-150 letters, digits, '_', '-' or '.' "
                      f"(not starting with '.' or '-'), got {name!r}")
    samples = record.get("num_samples", 1)
    if not allow_samples and "num_samples" in record:
        errors.append(f"{where}: field 'num_samples' is not allowed here (one row is one output)")
    elif isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES_PER_LINE:
        errors.append(f"{where}: field 'num_samples' must be an integer in [1, {MAX_SAMPLES_PER_LINE}], "
                      f"got {samples!r}")
        samples = 1
    audio, melody = (_file_field(record, key, where, base, errors) for key in ("audio_prompt", "melody"))
    values = {k: record[k] for k in PARAM_FIELDS if k in record}
    if "duration" in values and "max_new_tokens" in values:  # a line's own length wins over the flag's default
        values.pop("max_new_tokens" if "duration" in record else "duration")
    if values.get("seed") is None:
        values["seed"] = next_seed if next_seed is not None else secrets.randbelow(SEED_MAX - samples)
    base_params = None
    try:
        base_params = SamplingParams(**values)
        if base_params.seed + samples - 1 > SEED_MAX:
            raise RequestError(f"seed + num_samples - 1 must be ≤ 2**63 - 1, got seed {base_params.seed}")
    except RequestError as exc:
        errors += _param_errors(values, where, exc)
    if errors:
        raise ManifestError("; ".join(errors), errors)
    if samples == 1:
        return [JobItem(name, prompt, base_params, audio, where, melody)]
    return [JobItem(f"{name}-{j}", prompt, dataclasses.replace(base_params, seed=base_params.seed + j), audio,
                    f"{where} sample {j}", melody) for j in range(samples)]


def _file_field(record: dict[str, Any], key: str, where: str, base: Path, errors: list[str]) -> Path | None:
    """A line's audio file (audio_prompt, melody): a path relative to the manifest, which must exist."""
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        errors.append(f"{where}: field {key!r} must be a path (relative to the manifest)")
        return None
    path = base / Path(value).expanduser()
    if not path.is_file():
        errors.append(f"{where}: field {key!r}: no such file {str(path)!r}")
    return path


def _param_errors(values: dict[str, Any], where: str, exc: RequestError) -> list[str]:
    """Every sampling field that is wrong on its own (each named), else the error of their combination."""
    errors = []
    for key, value in values.items():
        try:
            SamplingParams(**{key: value})
        except RequestError as alone:
            errors.append(f"{where} (field {key!r}): {alone}")
    if errors:
        return errors
    field = next((f for f in PARAM_FIELDS if str(exc).startswith(f)), None)
    return [f"{where}{f' (field {field!r})' if field else ''}: {exc}"]


def check_names(items: list[JobItem], problems: Problems | None = None) -> list[JobItem]:
    """Names unique in the job (case-insensitive); every clash reported."""
    own = problems is None
    problems = Problems() if own else problems
    seen: dict[str, JobItem] = {}
    for item in items:
        key = item.name.casefold()  # case-insensitive filesystems would put both in one file
        if key in seen:
            problems.add(f"{item.source}: name {item.name!r} is already used by {seen[key].source}; names must be "
                         "unique (they are the file names)", _line(item))
        else:
            seen[key] = item
    if own:
        problems.raise_if_any()
    return items


def _line(item: JobItem) -> int:
    """The line number in an item's source ("jobs.jsonl line 7 sample 2" → 7), for ordering its problems."""
    match = re.search(r"(?:line|prompt) (\d+)", item.source)
    return int(match.group(1)) if match else 0


def check_limits(items: list[JobItem], info: CheckpointInfo, problems: Problems | None = None) -> float:
    """Every output's length (audio prompt included) within what the engine will accept, and its extend_stride within
    the window, before loading it; every output over is reported (ManifestError, or added to ``problems``). Returns
    the longest good output's span in seconds (what the engine must accept)."""
    own = problems is None
    problems = Problems() if own else problems
    limit_frames = round(info.max_duration_s * info.frame_rate)
    hop = info.sample_rate // info.frame_rate
    prompt_frames: dict[Path, int | ManifestError] = {}
    strides: dict[float | None, str | None] = {}  # extend_stride → its error, if any
    longest = 0
    for item in items:
        params, line = item.params, _line(item)
        if item.melody is not None and not info.melody:
            problems.add(f"{item.source} (field 'melody'): this checkpoint is a text-to-music MusicGen; melody "
                         "conditioning needs a MusicGen-Melody checkpoint (e.g. facebook/musicgen-melody)", line)
        if params.extend_stride not in strides:
            try:
                info.check_stride(params.extend_stride)
                strides[params.extend_stride] = None
            except RequestError as exc:
                strides[params.extend_stride] = str(exc)
        if strides[params.extend_stride] is not None:
            problems.add(f"{item.source} (field 'extend_stride'): {strides[params.extend_stride]}", line)
        if params.duration is not None:
            frames = max(1, round(params.duration * info.frame_rate))
        elif params.max_new_tokens is not None:
            frames = params.max_new_tokens + 1 - info.channel_codebooks
            if frames < 1:
                problems.add(f"{item.source} (field 'max_new_tokens'): must be ≥ {info.channel_codebooks} for this "
                             f"model, got {params.max_new_tokens}", line)
                continue
        else:
            frames = round(info.default_duration_s * info.frame_rate)
        extra, what = 0, ""
        if item.audio_prompt is not None:
            if item.audio_prompt not in prompt_frames:
                try:
                    prompt_frames[item.audio_prompt] = _audio_frames(item, info.sample_rate, hop)
                except ManifestError as exc:
                    prompt_frames[item.audio_prompt] = exc
            found = prompt_frames[item.audio_prompt]
            if isinstance(found, ManifestError):
                problems.add(str(found).replace(found.source, item.source, 1), line)  # type: ignore[attr-defined]
                continue
            extra = found
            what = f" + {extra / info.frame_rate:.2f} s of audio prompt"
        if frames + extra > limit_frames:
            problems.add(f"{item.source} (field 'duration'): {frames / info.frame_rate:.2f} s{what} is over the "
                         f"limit of {info.max_duration_s:.2f} s per request (max_duration_s, --max-duration; at "
                         f"most {MAX_REQUEST_DURATION_S:g} s)", line)
            continue
        longest = max(longest, frames + extra)
    if own:
        problems.raise_if_any()
    return longest / info.frame_rate


def _audio_frames(item: JobItem, sample_rate: int, hop: int) -> int:
    from fastgen.audio import read_audio
    try:
        audio, rate = read_audio(item.audio_prompt)
    except Exception as exc:  # soundfile raises its own error types for undecodable files
        error = ManifestError(f"{item.source} (field 'audio_prompt'): cannot read {item.audio_prompt} ({exc})")
    else:
        samples = math.ceil(audio.shape[-1] * sample_rate / rate)
        if samples:
            return -(-samples // hop)
        error = ManifestError(f"{item.source} (field 'audio_prompt'): {item.audio_prompt} holds no samples")
    error.source = item.source  # type: ignore[attr-defined]  # (the message is reused for items sharing the file)
    raise error
