"""The `kernelbox` command: `serve` (needs the server distribution), `exec`, `agent`."""

from __future__ import annotations

import argparse
import sys

from . import _exec
from .agent import cli as agent_cli


def _serve(args: argparse.Namespace) -> int:
    try:
        from kernelbox_server.service.main import serve
        from kernelbox_server.service.settings import Settings
    except ImportError as exc:
        print(
            "kernelbox serve needs the server distribution, kernelbox-server: from a clone of "
            f"the repository, pip install ./client . ({exc})",
            file=sys.stderr,
        )
        return 2
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "backend": args.backend,
            "api_key": args.api_key,
        }.items()
        if v is not None
    }
    serve(Settings(**overrides), key_on_command_line=args.api_key is not None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelbox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the service (every flag also from KERNELBOX_* environment variables)"
    )
    serve.add_argument("--host", help="address to bind (default: $KERNELBOX_HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $KERNELBOX_PORT, else 8000)")
    serve.add_argument(
        "--backend",
        choices=["local", "docker"],
        help="where kernels run (default: $KERNELBOX_BACKEND, else local)",
    )
    serve.add_argument(
        "--api-key",
        help="require this key (comma-separate several). Every user of the machine can read "
        "it in the process list: prefer KERNELBOX_API_KEY or KERNELBOX_API_KEY_FILE "
        "(default: those, else no key)",
    )
    serve.set_defaults(func=_serve)

    _exec.add_parser(commands)
    agent_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
