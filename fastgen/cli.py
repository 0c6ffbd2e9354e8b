"""Command line: ``fastgen generate [--model DIR] "prompt" ... --duration 8 --out out/`` writes one audio file per
prompt, or per line of a --manifest, as each finishes. Without --model it uses a built-in tiny checkpoint with random
weights: it makes noise, not music, and only shows that everything runs."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fastgen.config import QUANTIZATIONS, QUANTIZE_HELP
from fastgen.errors import FastgenError
from fastgen.serve.server import COMPILE_HELP, THREADS_HELP  # (argparse only: FastAPI is imported when serving)

_CHECKPOINT_DEFAULT = "(default: the checkpoint's generation_config.json, else %s)"
BUILTIN_DIR = Path.home() / ".cache" / "fastgen" / "builtin-tiny-random"
NOISE_WARNING = ("note: no --model given, so fastgen uses its built-in tiny checkpoint with RANDOM weights; it makes "
                 "noise, not music. Pass --model <checkpoint folder or hub id> (e.g. facebook/musicgen-small).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate audio files from text prompts or a manifest")
    gen.add_argument("prompts", nargs="*", help="text prompts, one output file each (default: none)")
    gen.add_argument("--prompts-file", type=Path, metavar="FILE",
                     help="a text file with one prompt per line (default: none)")
    gen.add_argument("--manifest", type=Path, metavar="FILE",
                     help="a JSON-lines job: one object per line with prompt (string or null) and optionally name, "
                          "audio_prompt, melody, num_samples and any sampling field (duration, seed, top_k, "
                          "extend_stride, …) (default: none)")
    gen.add_argument("--model", help="checkpoint folder or hub id, or an audiocraft export's folder (default: "
                                     "built-in tiny random model)")
    gen.add_argument("--text-encoder", metavar="DIR",
                     help="an audiocraft export's T5: a Hugging Face folder or hub id (default: the one its xp.cfg "
                          "names, from the hub)")
    gen.add_argument("--audio-encoder", metavar="DIR",
                     help="an audiocraft export's EnCodec: a Hugging Face folder or hub id (default: the one its "
                          "compression_state_dict.bin names, from the hub)")
    gen.add_argument("--out", type=Path, default=Path("out"), metavar="FOLDER",
                     help="output folder; results.jsonl there records every finished file (default: out/)")
    gen.add_argument("--format", choices=["wav", "flac", "ogg"], default="wav", help="audio file format "
                                                                                   "(default: wav)")
    gen.add_argument("--duration", type=float, metavar="SECONDS",
                     help="seconds of audio per output (default: the checkpoint's generation_config.json: 29.92 s "
                          "for musicgen-small and the other facebook checkpoints, 5.04 s for the built-in tiny model)")
    gen.add_argument("--extend-stride", type=float, metavar="SECONDS",
                     help="long-form: past the window, each new window adds this many seconds, continuing from the "
                          "window's last (window - stride) seconds (default: 18 s of a 30 s window)")
    gen.add_argument("--audio-prompt", type=Path, metavar="FILE",
                     help="an audio file every prompt continues, any rate and channels (default: none)")
    gen.add_argument("--melody", type=Path, metavar="FILE",
                     help="a melody every prompt follows, any rate and channels (its first 30 s): MusicGen-Melody "
                          "checkpoints (default: none)")
    gen.add_argument("--guidance-scale", type=float, metavar="G",
                     help=f"classifier-free guidance: how closely outputs follow the prompt; 1 turns it off "
                          f"{_CHECKPOINT_DEFAULT % 'guidance_scale 3.0'}")
    gen.add_argument("--temperature", type=float, metavar="T",
                     help=f"sampling temperature; lower is more conservative {_CHECKPOINT_DEFAULT % 'temperature 1.0'}")
    gen.add_argument("--top-k", type=int, metavar="K",
                     help=f"sample among the K likeliest tokens; 0 turns it off {_CHECKPOINT_DEFAULT % 'top_k 250'}")
    gen.add_argument("--top-p", type=float, metavar="P",
                     help=f"nucleus sampling: among the likeliest tokens that make up P of the probability; 0 turns it "
                          f"off {_CHECKPOINT_DEFAULT % 'top_p 0'}")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (default: sampling)")
    gen.add_argument("--seed", type=int, help="seed of the first output; output i uses seed + i, unless its manifest "
                                              "line gives a seed (default: a fresh random seed each, recorded)")
    gen.add_argument("--unconditional", type=int, default=0, metavar="N",
                     help="also generate N unconditional clips (default: 0)")
    gen.add_argument("--skip-existing", action="store_true",
                     help="resume: skip outputs recorded in OUT/results.jsonl (unrecorded files are made again); "
                          "an --out with a results.jsonl is refused without this or --overwrite (default: off)")
    gen.add_argument("--overwrite", action="store_true",
                     help="start over in an --out that holds an earlier job: its results.jsonl is cleared first and "
                          "its files replaced as the new ones are written (default: off)")
    gen.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    gen.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on cuda and on CPUs "
                                                   "with native bf16, else float32)")
    gen.add_argument("--quantize", choices=[q for q in QUANTIZATIONS if q], default=None,
                     help=QUANTIZE_HELP + " (default: none)")
    gen.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                     help="kernels: triton (CUDA) or torch (default: auto, triton on CUDA and torch on a CPU)")
    gen.add_argument("--linear-backend", default=None, choices=["triton", "torch"],
                     help="decode-step projections: fused batch-invariant Triton kernels or torch (default: triton "
                          "on CUDA with the triton backend, else torch)")
    gen.add_argument("--max-slots", type=int, metavar="N",
                     help="concurrent requests (default: what the KV-cache budget holds, at most 256)")
    gen.add_argument("--max-duration", type=float, metavar="SECONDS",
                     help="longest request (audio prompt included) the engine accepts; below the window it also "
                          "sizes the slots, so smaller means more slots in the same memory (default: 300 s, or the "
                          "job's longest output up to 3600 s)")
    gen.add_argument("--window", type=float, metavar="SECONDS",
                     help="long-form: the window a longer output slides over, and a slot's span (default: the "
                          "model's trained 30 s)")
    gen.add_argument("--kv-cache-gib", type=float, metavar="GIB",
                     help="KV-cache memory budget (default: 2 GiB on a CPU, 75%% of free memory on a GPU)")
    gen.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (default: off)")
    gen.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP % "torch's, one per core")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="allow pickled .bin weights, loaded with weights_only (default: off, safetensors only)")
    gen.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                     help="on SIGINT/SIGTERM nothing new starts, and running requests get this long from the signal "
                          "to finish and be written; they are cut at once when they cannot make it (default: 10)")
    gen.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between 'progress:' lines on stderr when it is no terminal (default: 5)")
    gen.add_argument("--json", action="store_true",
                     help="print each file's results.jsonl line (JSON) on stdout on a terminal too (default: JSON "
                          "only when stdout is no terminal; a short line per file on one)")
    gen.add_argument("--ray", action="store_true",
                     help="run the job on Ray Data, pip install 'fastgen[ray]' (default: off, one process)")
    gen.add_argument("--workers", type=int, default=None, metavar="N",
                     help="with --ray: engines, one per GPU (default: 1)")
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    from fastgen.serve.server import add_arguments  # argparse only: FastAPI is imported when serving
    add_arguments(commands.add_parser("serve", help="serve generation over HTTP (needs fastgen[serve])"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from fastgen.batch.run import Interrupted
    try:
        if args.command == "serve":
            return _serve(args)
        return _generate(args, argv)
    # OSError: unreadable --prompts-file, unwritable --out; ModuleNotFoundError: an optional package (soundfile for
    # the output files) is missing, said in one line naming it
    except (FastgenError, ValueError, OSError, ModuleNotFoundError) as exc:
        print(f"fastgen: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", 2)
        if args.command == "serve":  # uvicorn handles SIGINT/SIGTERM itself; this is Ctrl-C during loading
            return 128 + signum
        print(f"fastgen: interrupted ({exc or 'SIGINT'}); outputs finished so far are recorded in "
              f"{args.out / 'results.jsonl'}: rerun with --skip-existing to resume", file=sys.stderr)
        return 128 + signum


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    import fastgen
    from fastgen.batch.manifest import Problems, items_from_prompts, read_manifest
    from fastgen.batch.run import JobSpec, check_rerun_flags, run_job
    from fastgen.engine.threads import resolve_cpu_threads

    defaults = fastgen.SamplingParams(
        duration=args.duration, guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, do_sample=False if args.greedy else None, extend_stride=args.extend_stride)
    if args.seed is not None:
        fastgen.SamplingParams(seed=args.seed)  # validates it
    if args.unconditional < 0:
        raise ValueError(f"--unconditional must be ≥ 0, got {args.unconditional}")
    if args.workers is not None and (not args.ray or args.workers < 1):
        raise ValueError("--workers N (N ≥ 1) goes with --ray")
    problems = None
    if args.manifest is not None:
        if args.prompts or args.prompts_file or args.unconditional or args.audio_prompt or args.melody:
            raise ValueError("--manifest holds the whole job: give no prompts, --prompts-file, --unconditional, "
                             "--audio-prompt or --melody beside it (a line may name its own audio_prompt and melody)")
        problems = Problems()  # every bad line, reported with the limits' findings before anything loads
        items = read_manifest(args.manifest, defaults, args.seed, problems)
    else:
        prompts: list[str | None] = list(args.prompts)
        if args.prompts_file is not None:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        prompts += [None] * args.unconditional
        if not prompts:
            raise ValueError("give at least one prompt (or --prompts-file, --manifest, or --unconditional N)")
        for flag, path in (("--audio-prompt", args.audio_prompt), ("--melody", args.melody)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag}: no such file {str(path)!r}")
        items = items_from_prompts(prompts, defaults, args.seed, args.audio_prompt, args.melody)

    options = {"backend": args.backend}
    for key, value in (("linear_backend", args.linear_backend), ("max_slots", args.max_slots),
                       ("max_duration_s", args.max_duration), ("window_s", args.window)):
        if value is not None:
            options[key] = value
    if args.kv_cache_gib is not None:
        if not args.kv_cache_gib > 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
        options["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
    if args.compile:
        options["compile_step"] = True
    if args.quantize:
        options["quantization"] = args.quantize
    fastgen.EngineConfig(**options)  # bad engine options fail here, before anything is loaded
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    threads = resolve_cpu_threads(args.threads)  # a bad $FASTGEN_CPU_THREADS fails now too
    check_rerun_flags(args.skip_existing, args.overwrite)
    if not args.grace >= 0:
        raise ValueError(f"--grace must be ≥ 0 seconds, got {args.grace}")
    if not args.progress_interval >= 0:
        raise ValueError(f"--progress-interval must be ≥ 0 seconds, got {args.progress_interval}")

    model, name = args.model, args.model
    if model is None:
        print(NOISE_WARNING, file=sys.stderr)
        if not (BUILTIN_DIR / "config.json").is_file():
            _build_builtin()
        model, name = BUILTIN_DIR, "builtin-tiny-random"
    resume = [a for a in argv if a != "--overwrite"]
    resume = resume if "--skip-existing" in resume else [*resume, "--skip-existing"]
    spec = JobSpec(items=items, out=args.out, model=model, model_name=name, extension=f".{args.format}",
                   device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle, engine_options=options,
                   skip_existing=args.skip_existing, overwrite=args.overwrite, grace_s=args.grace,
                   resume_command=shlex.join(["fastgen", *resume]), progress_interval_s=args.progress_interval,
                   json_records=True if args.json else None, ray_workers=(args.workers or 1) if args.ray else None,
                   cpu_threads=threads, problems=problems,
                   encoders={k: v for k, v in (("text_encoder", args.text_encoder),
                                               ("audio_encoder", args.audio_encoder)) if v is not None})
    if args.ray:  # Ray is an optional extra: imported only for --ray
        from fastgen.batch.ray_data import execute_on_ray
        return run_job(spec, execute=execute_on_ray)
    return run_job(spec)


def _serve(args: argparse.Namespace) -> int:
    if args.model is None:
        print(NOISE_WARNING, file=sys.stderr)
        if not (BUILTIN_DIR / "config.json").is_file():
            _build_builtin()
        args.model = str(BUILTIN_DIR)
    if args.ray:  # Ray Serve replicas, or uvicorn in this process
        from fastgen.serve.ray_serve import run_ray
        return run_ray(args)
    from fastgen.serve.server import main as serve_main
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
