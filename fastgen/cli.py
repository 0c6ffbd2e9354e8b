"""Command line: ``fastgen generate [--model DIR] "prompt" ... --duration 8 --out out/`` writes one audio file per
prompt. Without --model it uses a built-in tiny checkpoint with random weights: it makes noise, not music, and only
shows that everything runs."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastgen.errors import FastgenError

BUILTIN_DIR = Path.home() / ".cache" / "fastgen" / "builtin-tiny-random"
NOISE_WARNING = ("note: no --model given, so fastgen uses its built-in tiny checkpoint with RANDOM weights; it makes "
                 "noise, not music. Pass --model <checkpoint folder or hub id> (e.g. facebook/musicgen-small).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate audio files from text prompts")
    gen.add_argument("prompts", nargs="*", help="text prompts (one output file each)")
    gen.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    gen.add_argument("--model", help="checkpoint folder or hub id (default: built-in tiny random model)")
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    gen.add_argument("--format", choices=["wav", "flac", "ogg"], default="wav")
    gen.add_argument("--duration", type=float, help="seconds of audio per prompt")
    gen.add_argument("--audio-prompt", type=Path, help="an audio file every prompt continues (any rate and channels)")
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--seed", type=int, help="seed of the first prompt; prompt i uses seed + i")
    gen.add_argument("--unconditional", type=int, default=0, metavar="N", help="also generate N unconditional clips")
    gen.add_argument("--skip-existing", action="store_true", help="skip prompts whose output file exists (resume)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on cuda)")
    gen.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    gen.add_argument("--max-slots", type=int, help="concurrent requests (default: from the memory budget)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step (CPU: several times faster on small models after a "
                          "one-off compile of tens of seconds; needs a C++ compiler)")
    gen.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (weights_only load)")
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    from fastgen.serve.server import add_arguments  # argparse only: FastAPI is imported when serving
    add_arguments(commands.add_parser("serve", help="serve generation over HTTP (needs fastgen[serve])"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _generate(args)
    except (FastgenError, ValueError, OSError) as exc:  # OSError: unreadable --prompts-file, unwritable --out
        print(f"fastgen: error: {exc}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import torch

    import fastgen
    from fastgen.audio import read_audio, safe_filename, write_audio

    prompts: list[str | None] = list(args.prompts)
    if args.prompts_file is not None:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if args.unconditional < 0:
        raise ValueError(f"--unconditional must be ≥ 0, got {args.unconditional}")
    prompts += [None] * args.unconditional
    if not prompts:
        raise ValueError("give at least one prompt (or --prompts-file, or --unconditional N)")

    audio_prompt = None
    if args.audio_prompt is not None:
        try:
            audio_prompt = read_audio(args.audio_prompt)
        except Exception as exc:  # soundfile raises its own error types for missing or undecodable files
            raise ValueError(f"--audio-prompt: cannot read {args.audio_prompt} ({exc})") from None
    model_path = args.model
    if model_path is None:
        print(NOISE_WARNING, file=sys.stderr)
        if not (BUILTIN_DIR / "config.json").is_file():
            _build_builtin()
        model_path = BUILTIN_DIR
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"backend": args.backend}
    if args.max_slots is not None:
        options["max_slots"] = args.max_slots
    if args.compile:
        options["compile_step"] = True
    model = fastgen.MusicGen.from_pretrained(model_path, device=device, dtype=args.dtype,
                                             allow_pickle=args.allow_pickle, **options)

    targets = [args.out / safe_filename(p, i, extension=f".{args.format}") for i, p in enumerate(prompts)]
    todo = [i for i, t in enumerate(targets) if not (args.skip_existing and t.exists())]
    if len(todo) < len(prompts):
        print(f"skipping {len(prompts) - len(todo)} prompt(s) whose output exists", file=sys.stderr)
    params = [fastgen.SamplingParams(
        duration=args.duration, guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, do_sample=False if args.greedy else None,
        seed=None if args.seed is None else args.seed + i) for i in todo]
    start = time.perf_counter()
    outputs = model.generate([prompts[i] for i in todo], params, audio_prompts=audio_prompt,
                             progress=sys.stderr.isatty()) if todo else []
    elapsed = time.perf_counter() - start
    audio_seconds = 0.0
    for i, out in zip(todo, outputs):
        write_audio(targets[i], out.audio, out.sample_rate)
        audio_seconds += out.duration
        print(json.dumps({"prompt": prompts[i], "file": str(targets[i]), "seconds": round(out.duration, 3),
                          "seed": out.seed}))
    if outputs:
        print(f"wrote {len(outputs)} file(s), {audio_seconds:.1f} s of audio in {elapsed:.1f} s "
              f"({audio_seconds / elapsed:.2f}× real time) to {args.out}/", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fastgen.serve.server import main as serve_main
    if args.model is None:
        print(NOISE_WARNING, file=sys.stderr)
        if not (BUILTIN_DIR / "config.json").is_file():
            _build_builtin()
        args.model = str(BUILTIN_DIR)
    return serve_main(args)


def _build_builtin() -> None:
    """Build the tiny checkpoint beside BUILTIN_DIR and move it in place, so an interrupted build never leaves a
    half-written folder that later runs would take for complete."""
    import shutil
    import tempfile

    from fastgen.tiny import build_tiny_checkpoint
    BUILTIN_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_DIR.name}-", dir=BUILTIN_DIR.parent))
    try:
        build_tiny_checkpoint(staging, seed=0, overwrite=True)
        if not (BUILTIN_DIR / "config.json").is_file():  # a partial folder from an older fastgen
            shutil.rmtree(BUILTIN_DIR, ignore_errors=True)
        try:
            staging.rename(BUILTIN_DIR)
        except OSError:  # another process got there first
            if not (BUILTIN_DIR / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
