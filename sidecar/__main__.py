"""``python -m sidecar [--host H] [--port P] [--otlp-grpc-port G]``: the sidecar on default settings (the bench starts it this way).

Operators use ``muai sidecar``, which reads the YAML file and environment; this entry point exists so the
sidecar can run as a bare process without the CLI.
"""

from __future__ import annotations

import argparse
import sys

from sidecar.app import run
from sidecar.config import DEFAULT_PORT, SidecarConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--otlp-grpc-port", type=int, default=None,
                        help="the OTLP/gRPC receiver's port (default: sidecar.otlp_grpc_port's default, 4317)")
    args = parser.parse_args(argv)
    extra = {"otlp_grpc_port": args.otlp_grpc_port} if args.otlp_grpc_port is not None else {}
    return run(SidecarConfig(host=args.host, port=args.port, **extra))


if __name__ == "__main__":
    sys.exit(main())
