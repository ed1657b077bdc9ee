"""The state commands (`db`, `keys`, `usage`): each in its own module, imported only when run."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..config import Config


def run(command: str, argv: Sequence[str], config: Config) -> int:
    """Run ``at-gateway <command> <argv...>`` against ``config``'s store; the exit status."""
    if command == "keys":
        from .keys_cli import main as keys_main

        return keys_main(list(argv), config)
    if command == "db":
        from .db_cli import main as db_main

        return db_main(list(argv), config)
    if command == "usage":
        from .usage_cli import main as usage_main

        return usage_main(list(argv), config)
    print(f"at-gateway: unknown command {command!r}", file=sys.stderr)
    return 2
