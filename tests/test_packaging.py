"""Packaging metadata: what `pip install` reads on every set-up."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _project_table() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, re.S | re.M)
    assert m, "pyproject.toml has no [project] table"
    return m.group(1)


def test_license_is_an_spdx_string() -> None:
    """setuptools >= 77 warns on every build about `license = {text = ...}` (a table): use the SPDX string."""
    project = _project_table()
    m = re.search(r'^license\s*=\s*(.+)$', project, re.M)
    assert m, "no license in [project]"
    assert re.fullmatch(r'"[A-Za-z0-9.\-+ ()]+"', m.group(1).strip()), m.group(1)
    # An SPDX license and a `License ::` classifier together are an error in setuptools >= 77.
    assert "License ::" not in project


def test_build_backend_understands_spdx_licenses() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'setuptools>=(\d+)', text)
    assert m and int(m.group(1)) >= 77, "SPDX license strings need setuptools >= 77 (PEP 639)"


def test_make_run_installs_no_test_extras() -> None:
    """`make run` serves: it must not wait for pytest, the SDKs and mypy to install."""
    makefile = (ROOT / "Makefile").read_text()
    run = re.search(r"^run:(.*)$", makefile, re.M)
    assert run, "no run target"
    stamp = run.group(1).split()[0]
    recipe = re.search(rf"^{re.escape(stamp)}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, f"no rule for {stamp}"
    assert "[test]" not in recipe.group(1)
    assert "-e ." in recipe.group(1)
