"""Command line: ``serve`` (default), ``check-config``, ``version``.

Imports are lazy on purpose: ``version`` and ``check-config`` must not pay for
the server, the upstream client or cryptography (start-up cost on small
servers, and the .pyz's compiled-wheel extraction).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__


def _port(text: str) -> int:
    """A port number, or argparse's usage error (never a traceback from bind())."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at-gateway", description="A self-hosted LLM API gateway.")
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (the default command)")
    # The options are accepted before and after the command. A subcommand's defaults would overwrite what
    # was given before it (`--config X serve` would lose X), so there they are set only when given.
    for sp, default in ((p, None), (serve, argparse.SUPPRESS)):
        sp.add_argument("--config", default=default, help="config file (default: $AT_GATEWAY_CONFIG, "
                                                          "./config.yaml, /etc/at-gateway/config.yaml)")
        sp.add_argument("--host", default=default, help="listen address (overrides the config)")
        sp.add_argument("--port", type=_port, default=default, help="listen port (overrides the config)")
    check = sub.add_parser("check-config", help="validate a config file; exit 0 when valid, 1 otherwise")
    check.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    sub.add_parser("version", help="print the version and the commit it was built from")
    # State commands: their own options are parsed by their modules (at_gateway/store/*_cli.py).
    for name, text in STATE_COMMANDS.items():
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


#: Commands that work on the store (the database), while the gateway runs or not.
STATE_COMMANDS = {
    "db": "the database: `db info`, `db backup FILE` (safe while serving), `db rotate-key --new-key-env NAME`",
    "keys": "client keys: create, list, show, update, disable, enable, revoke, rotate",
    "usage": "requests, tokens and cost as a table (--key, --since, --by day|route|model|key)",
}


def _take_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config X`` / ``--config=X`` anywhere in a state command's arguments."""
    rest: list[str] = []
    config = None
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config = next(it, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


def _split_state_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[global options] db|keys|usage`` and the rest, which goes to that command's own parser whole.

    argparse's REMAINDER does not take a first argument that looks like an option (``usage --by
    route`` would be refused), so the split happens before argparse sees the arguments."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in STATE_COMMANDS:
            return argv[:i + 1], argv[i + 1:]
        if tok in ("--config", "--host", "--port"):
            i += 2
        elif tok.startswith("-"):
            i += 1
        else:
            break  # another command (serve, check-config, version): argparse as usual
    return argv, []


def build_info() -> str:
    try:
        from ._build import COMMIT  # written by build_zipapp.py
    except ImportError:
        COMMIT = _git_commit()
    return f"at-gateway {__version__} ({COMMIT or 'unknown commit'})"


def _git_commit() -> str | None:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, tail = _split_state_command(argv)
    args = _parser().parse_args(head)
    command = args.command or "serve"
    if command == "version":
        print(build_info())
        return 0
    from .config import find_config, load_config
    from .errors import ConfigError

    state_args: list[str] = []
    if command in STATE_COMMANDS:
        explicit, state_args = _take_config([*args.args, *tail])
        if explicit:
            args.config = explicit
    try:
        path = find_config(getattr(args, "config", None))
        config = load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    if command == "check-config":
        print(f"{path}: OK ({len(config.providers)} provider(s), {len(config.routes)} route(s))")
        return 0
    if command in STATE_COMMANDS:
        from .store.cli import run as run_state

        return run_state(command, state_args, config)
    from dataclasses import replace

    if args.host:
        config = replace(config, host=args.host)
    if args.port is not None:
        config = replace(config, port=args.port)
    from .service import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
