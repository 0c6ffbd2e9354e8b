"""Ray Serve: the same FastAPI app as a Serve deployment (FastAPI ingress), one AsyncEngine per replica, built by
the app's lifespan inside the replica. Responses, streamed ones included, go through Serve's HTTP proxy.

``max_ongoing_requests`` is raised from Serve's default of 5 to at least the engine's slots plus its queue: a lower
cap would starve continuous batching (requests would wait in the proxy instead of joining the running batch)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable

from fastgen.serve.app import ServerSettings, create_app

DEFAULT_ONGOING = 256  # the engine's slot cap (fastgen.engine.setup.MAX_SLOTS) when --max-slots is not given


def deployment(engine_factory: Callable[[], Any], settings: ServerSettings, *, replicas: int = 1,
               max_ongoing_requests: int = DEFAULT_ONGOING, num_gpus: float = 0, num_cpus: float = 1,
               graceful_shutdown_s: float = 30.0):
    """A bound Serve application: ``serve.run(deployment(...))``."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be ≥ 1, got {replicas}")
    app = create_app(engine_factory, settings)

    @serve.deployment(name="fastgen")
    @serve.ingress(app)
    class FastgenReplica:
        """One engine per replica; the routes are the FastAPI app's."""

    return FastgenReplica.options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=graceful_shutdown_s,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus}).bind()


def run_ray(args: argparse.Namespace) -> int:
    """``fastgen serve --ray``: start (or join, with RAY_ADDRESS) a cluster, serve until SIGTERM / Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        print(f"fastgen serve --ray needs Ray Serve (from a checkout: pip install -e '.[ray]'): {exc}", file=sys.stderr)
        return 2
    from fastgen.serve.server import engine_factory, settings_from

    ray.init()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ongoing = (args.max_slots or DEFAULT_ONGOING) + (args.max_queue or 0)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(engine_factory(args), settings_from(args), replicas=args.replicas,
                         max_ongoing_requests=ongoing, num_gpus=gpus, num_cpus=0 if gpus else 1,
                         graceful_shutdown_s=args.grace_s), name="fastgen", route_prefix="/")
    print(f"fastgen: serving on http://{args.host}:{args.port} with {args.replicas} replica(s)", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas drain their in-flight requests for up to --grace-s
    ray.shutdown()
    return 0
