"""Helpers for the one-file build's tests: build the .pyz once per session, run it, repack it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from tests.mock_upstream import wait_until

REPO = Path(__file__).resolve().parent.parent
#: The interpreter the tests run on, without its venv: with -I -S it sees no site-packages at all.
PYTHON = os.path.realpath(sys.executable)

_built: dict[str, Path] = {}


def missing_tool(reason: str) -> NoReturn:
    """Skip a test for lack of a tool, or fail it where the tools must be there.

    ``.ci/run`` installs them and sets ``AT_GATEWAY_REQUIRE_TOOLS=1``, so that a tool gone
    missing on the CI machine fails loudly instead of silently skipping what it tests.
    """
    if os.environ.get("AT_GATEWAY_REQUIRE_TOOLS"):
        pytest.fail(f"{reason}; AT_GATEWAY_REQUIRE_TOOLS is set, so this is an error (see .ci/run)")
    pytest.skip(reason)


def build_pyz(out: Path, extra_env: dict[str, str] | None = None) -> Path:
    """Run build_zipapp.py (wheels come from the repo's cache, downloaded once on a clean machine)."""
    proc = subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "-o", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(extra_env or {})})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def session_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .pyz of this checkout, built once per test session whichever module asks first.

    ``AT_GATEWAY_TEST_PYZ=FILE`` tests that file instead (a release artefact, or an older build).
    """
    if "pyz" not in _built:
        given = os.environ.get("AT_GATEWAY_TEST_PYZ")
        _built["pyz"] = Path(given).resolve() if given else build_pyz(tmp_path_factory.mktemp("pyz") / "at-gateway.pyz")
    return _built["pyz"]


def repack(src: Path, dst: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of the .pyz with some entries replaced (bytes) or removed (None)."""
    with zipfile.ZipFile(src) as zin, open(dst, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                if info.filename not in replace:
                    zout.writestr(info, zin.read(info))
            for name, data in replace.items():
                if data is not None:
                    zout.writestr(name, data)
    dst.chmod(0o755)
    return dst


def pyz_cmd(pyz: Path, *args: str, python: str = PYTHON) -> list[str]:
    return [python, "-I", "-S", str(pyz), *args]


def log_records(text: str) -> list[dict]:
    """The JSON log lines of a gateway's stderr (other lines skipped)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def log_text(record: dict) -> str:
    """A log record's message, whichever name the field has ("msg" now, "message" before)."""
    return str(record.get("msg", record.get("message", "")))


@contextmanager
def pyz_process(pyz: Path, config: Path, tmp_path: Path, env: dict[str, str] | None = None,
                python: str = PYTHON, wrap: Sequence[str] = ()) -> Iterator[tuple]:
    """``python3 -I -S at-gateway.pyz serve`` on a port the OS picks; yields (proc, url, stderr path).

    ``wrap``: a command the gateway's is appended to (and that ends up exec'ing it, so that ``proc``
    is the gateway), e.g. ``unshare`` to run it in a mount namespace of its own.
    """
    logpath = tmp_path / "pyz-stderr.log"
    log = open(logpath, "wb")
    cmd = [*wrap, *pyz_cmd(pyz, "serve", "--config", str(config), "--port", "0", python=python)]
    proc = subprocess.Popen(cmd, stderr=log, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ.get("PATH", ""), **(env or {})})
    try:
        port = None

        def ready() -> bool:
            nonlocal port
            for record in log_records(logpath.read_text()):
                if "listening on" in log_text(record):
                    port = int(log_text(record).rsplit(":", 1)[1])
                    return True
            return proc.poll() is not None

        assert wait_until(ready, 20) and port, logpath.read_text()
        yield proc, f"http://127.0.0.1:{port}", logpath
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()
