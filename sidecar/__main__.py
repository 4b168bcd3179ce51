"""``python -m sidecar [--host H] [--port P]``: the sidecar on default settings (the bench starts it this way).

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
    args = parser.parse_args(argv)
    return run(SidecarConfig(host=args.host, port=args.port))


if __name__ == "__main__":
    sys.exit(main())
