"""``fastgen serve``: its flags, the engine recipe, and the app under uvicorn (one process, one engine);
fastgen.serve.ray_serve serves it on Ray Serve (``--ray``: the command line picks).

SIGTERM (and Ctrl-C): uvicorn stops accepting connections, lets in-flight requests finish for ``--grace-s``
seconds, cancels what is left (their requests are aborted), shuts the engine down and the process exits 0."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable

from fastgen.config import QUANTIZATIONS, QUANTIZE_HELP

API_KEY_ENV = "FASTGEN_API_KEY"


COMPILE_HELP = ("CPU: torch.compile the decode step: several times faster on small models, after a one-off compile "
                "of tens of seconds for a tiny model and 3-7 minutes for musicgen-small on 2 cores (cached on disk "
                "afterwards); needs a C++ compiler")
THREADS_HELP = ("CPU: intra-op threads the engine's decode runs with (default: $FASTGEN_CPU_THREADS if set, else "
                "%s); fewer leaves cores to other jobs on a shared machine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder or hub id (default: built-in tiny random model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting beyond the running ones; more get 503 + Retry-After (default: 256)")
    parser.add_argument("--api-key", default=None,
                        help=f"require this key (Authorization: Bearer KEY) (default: ${API_KEY_ENV} if set, else "
                             "no key)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish (default: 30)")
    parser.add_argument("--max-audio-prompt-mb", type=float, default=16.0,
                        help="largest audio prompt upload in MiB (default: 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="float32, float16 or bfloat16 (default: bf16 on cuda and on CPUs with native bf16, "
                             "else float32)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                        help="kernels: triton (CUDA) or torch (default: auto, triton on CUDA and torch on a CPU)")
    parser.add_argument("--linear-backend", default=None, choices=["triton", "torch"],
                        help="decode-step projections (default: triton on CUDA with the triton backend, else torch)")
    parser.add_argument("--max-slots", type=int,
                        help="concurrent requests (default: what the KV-cache budget holds, at most 256)")
    parser.add_argument("--max-duration", type=float, default=None, metavar="SECONDS",
                        help="longest request in seconds, audio prompt included (default: 300)")
    parser.add_argument("--window", type=float, default=None, metavar="SECONDS",
                        help="long-form: decoder window in seconds (default: the trained 30 s)")
    parser.add_argument("--quantize", choices=[q for q in QUANTIZATIONS if q], default=None,
                        help=QUANTIZE_HELP + " (default: none)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=THREADS_HELP % "1 for the server's engine thread")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (default: off)")
    parser.add_argument("--ray", action="store_true",
                        help="serve through Ray Serve (from a checkout: pip install -e '.[ray]') (default: off, one "
                             "process)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="--ray: engine replicas, one GPU each on GPUs (default: 1)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level; info shows the loaded engine and each request (default: info)")


# flag (argparse dest) → EngineConfig option, passed when given
_ENGINE_FLAGS = {"linear_backend": "linear_backend", "max_slots": "max_slots", "max_duration": "max_duration_s",
                 "max_queue": "max_waiting", "window": "window_s", "quantize": "quantization"}


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """A picklable-by-value recipe for the AsyncEngine (Ray ships it to each replica). Checks the flags first."""
    if args.max_queue is not None and args.max_queue < 1:
        raise ValueError(f"--max-queue must be ≥ 1, got {args.max_queue}")
    options: dict[str, Any] = {"backend": args.backend}
    options.update({option: getattr(args, flag) for flag, option in _ENGINE_FLAGS.items()
                    if getattr(args, flag) is not None})
    if args.compile:
        options["compile_step"] = True
    threads = getattr(args, "threads", None)
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    return EngineRecipe(str(args.model), args.device, args.dtype, options, threads)


class EngineRecipe:
    def __init__(self, model: str, device: str | None, dtype: str | None, options: dict[str, Any],
                 cpu_threads: int | None = None) -> None:
        self.model, self.device, self.dtype, self.options = model, device, dtype, options
        self.cpu_threads = cpu_threads

    def __call__(self):
        import time

        import torch

        from fastgen import AsyncEngine
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        engine = AsyncEngine.from_pretrained(self.model, device=device, dtype=self.dtype,
                                             cpu_threads=self.cpu_threads, **self.options)
        # uvicorn's own logger: shown with its start-up lines at --log-level info
        logging.getLogger("uvicorn.error").info("%s (in %.1f s)", describe_engine(self.model, engine),
                                                time.perf_counter() - started)
        return engine


def describe_engine(model: str, engine: Any) -> str:
    """One line: what a server (or replica) loaded and how it runs."""
    core = engine.engine
    decoder = core.model.decoder
    threads = f", {engine.cpu_threads} decode thread(s)" if core.device.type == "cpu" else ""
    return (f"fastgen: loaded {model} on {core.device}: dtype {str(decoder.dtype).removeprefix('torch.')}, "
            f"quantization {decoder.quantization or 'none'}, {core.num_slots} slot(s) of up to "
            f"{core.max_frames / core.frame_rate:.2f} s{threads}")


def settings_from(args: argparse.Namespace):
    from fastgen.serve.app import ServerSettings
    return ServerSettings(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_audio_prompt_bytes=int(args.max_audio_prompt_mb * (1 << 20)))


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fastgen.serve.app import create_app
    except ImportError as exc:
        print(f"fastgen serve needs the serve extra (from a checkout: pip install -e '.[serve]'): {exc}",
              file=sys.stderr)
        return 2
    app = create_app(engine_factory(args), settings_from(args))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_s, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn hands a caught SIGTERM / SIGINT to the handler it found once it has shut down: make that a no-op, so a
    # graceful stop exits 0 rather than dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
