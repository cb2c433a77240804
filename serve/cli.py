"""``gt-ray serve``: run the provider service, listening on 127.0.0.1 by default, until Ctrl-C.

    gt-ray serve --checkpoint runs/world_lengths/translator --card runs/world_lengths/pair_card.json \\
        --tokens runs/world_lengths/tokens.json --state-dir runs/world_lengths/serve_state \\
        [--host 127.0.0.1 --port 8000] [--max-batch-size 8 --batch-wait-timeout-s 0.01] \\
        [--max-body-bytes N] [--outlier-factor 10] [--address ray://... | auto] [--num-cpus 2] [--temp-dir D]

Without ``--address`` it starts a local Ray cluster bound to loopback. This launcher is
kept apart from ``serve/app.py`` because Ray reads its network settings when it is
imported: the environment is set first, then ray and the app are imported. Ctrl-C or
SIGTERM stops it and shuts Serve (and a local cluster) down.
"""

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every port on 127.0.0.1 (docs/cluster.md)
    "RAY_AUTH_MODE": "disabled",  # the embedded local cluster only; a real cluster keeps its auth
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",  # workers at the driver's priority, not nice 15
}
"""The same loopback settings as ``jobs.common.local_ray_env`` (serve does not import jobs)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``gt-ray serve`` argument parser; defaults come from :class:`serve.schemas.ProviderArgs`."""
    p = argparse.ArgumentParser(prog="gt-ray serve", description="Run the provider service (Ray Serve).")
    p.add_argument("--checkpoint", required=True, help="translator checkpoint directory")
    p.add_argument("--card", required=True, help="pair card JSON")
    p.add_argument("--tokens", required=True, help='tokens file {"admin": T, "orgs": {ORG: T}}')
    p.add_argument("--state-dir", required=True, help="where rounds and accepted vectors persist")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--batch-wait-timeout-s", type=float)
    p.add_argument("--max-ongoing-requests", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--outlier-factor", type=float, help="refuse vectors whose norm is this many times outside the "
                   "corpus' range, from input_norms.json beside the checkpoint (default 10)")
    p.add_argument("--translator-threads", type=int)
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one on loopback)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    p.add_argument("--temp-dir", help="Ray's temporary directory for the local cluster (keep it short: unix "
                   "sockets live there; default Ray's)")
    p.add_argument("--name", default="gt-ray", help="Serve application name")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Start the service and block until Ctrl-C; bad arguments print one ``error:`` line (exit 2)."""
    opts = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from serve.schemas import ProviderArgs

    given = {k: v for k, v in vars(opts).items() if k in ProviderArgs.model_fields and v is not None}
    try:
        args = ProviderArgs(**given)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors())
        print(f"error: {errors}", file=sys.stderr)
        raise SystemExit(2) from None

    if opts.address is None:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from serve.app import build_app

    if opts.address is None:
        ray.init(num_cpus=opts.num_cpus, object_store_memory=512 * 1024 * 1024, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", _temp_dir=opts.temp_dir)
    else:
        ray.init(address=opts.address)
    # After ray.init, which installs a fatal-signal handler: SIGTERM (what process managers
    # send) then stops the service like Ctrl-C, shutting Serve and the local cluster down.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), name=opts.name, route_prefix="/")
        print(f"url=http://{args.host}:{args.port} docs=http://{args.host}:{args.port}/docs "
              f"state_dir={args.state_dir} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
