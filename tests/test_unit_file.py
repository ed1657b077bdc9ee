"""deploy/at-gateway.service: what it promises, what systemd-analyze says of it, and its W^X rule."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.pyz_support import PYTHON, REPO, missing_tool, pyz_process, session_pyz

UNIT = REPO / "deploy" / "at-gateway.service"
ANALYZE = shutil.which("systemd-analyze")
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "min" else 1)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


@pytest.fixture
def unit_copy(pyz: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the built .pyz, so verify can check it is executable."""
    if ANALYZE is None:
        missing_tool("systemd-analyze not installed (apt-get install systemd; nothing needs to run)")
    path = tmp_path / "at-gateway.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/at-gateway", str(pyz)))
    return path


def test_service_basics() -> None:
    d = directives()
    assert d["User"] == ["at-gateway"] and d["Group"] == ["at-gateway"]
    assert d["ExecStart"] == ["/usr/local/bin/at-gateway serve --config /etc/at-gateway/config.yaml"]
    assert "-HUP $MAINPID" in d["ExecReload"][0]
    assert d["EnvironmentFile"] == ["-/etc/at-gateway/.env"]  # optional
    assert d["StateDirectory"] == ["at-gateway"]
    assert d["Restart"] == ["on-failure"]
    from at_gateway.config import build_config

    drain = build_config({"api_key": "k"}, "defaults").shutdown_timeout
    assert seconds(d["TimeoutStopSec"][0]) > drain


def test_sandbox() -> None:
    d = directives()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
                "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute"):
        assert d.get(key) == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert d["SystemCallArchitectures"] == ["native"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["UMask"] == ["0077"]


def test_systemd_analyze_verify(unit_copy: Path) -> None:
    out = subprocess.run([str(ANALYZE), "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_security_exposure_is_2_or_better(unit_copy: Path) -> None:
    out = subprocess.run([str(ANALYZE), "security", "--offline=true", "--no-pager", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in out.stderr and "unrecognized" in out.stderr:
        missing_tool("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m[1]) <= 2.0, out.stdout


def _mdwe_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    out = subprocess.run([PYTHON, "-I", "-S", "-c", f"import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl("
                          f"{PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)"], capture_output=True)
    return out.returncode == 0


MDWE_EXEC = f"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE) failed")
os.execv(sys.argv[1], sys.argv[1:])
"""

MDWE_CRYPTO = """
import mmap, sys
sys.path.insert(0, sys.argv[1])
from at_gateway import wheels
wheels.install()
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
key.public_key().verify(key.sign(b"x", padding.PKCS1v15(), hashes.SHA256()), b"x", padding.PKCS1v15(), hashes.SHA256())
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    print("W^X enforced")
"""


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_runs_under_memory_deny_write_execute(pyz: Path, tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes: the kernel's PR_SET_MDWE is the same rule; serve and cryptography cope."""
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([PYTHON, "-I", "-S", "-c", MDWE_EXEC, PYTHON, "-I", "-S", "-c", MDWE_CRYPTO, str(pyz)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "W^X enforced" in out.stdout, out.stderr
    # serving under the same rule (it is inherited across exec): a python3 that sets it first
    (tmp_path / "mdwe.py").write_text(MDWE_EXEC)
    launcher = tmp_path / "mdwe-python"
    launcher.write_text(f'#!/bin/sh\nexec {PYTHON} -I -S {tmp_path / "mdwe.py"} {PYTHON} "$@"\n')
    launcher.chmod(0o755)
    config = REPO / "config.yaml.example"
    with pyz_process(pyz, config, tmp_path, env=env, python=str(launcher)) as (proc, url, _):
        r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": "demo-key"}, timeout=10,
                       json={"model": "demo", "messages": [{"role": "user", "content": "w^x"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "w^x"


def dropin_text(port: int, drain: int) -> str:
    """install.sh's drop-in for a config with this port and shutdown_timeout (the script sourced, not run)."""
    out = subprocess.run(["bash", "-c", f'. "{REPO / "install.sh"}" && config_dropin_text {port} {drain}'],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_config_dropin_only_when_the_config_needs_it() -> None:
    assert dropin_text(8080, 30) == ""
    low = dropin_text(443, 30)
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in low and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low
    assert "TimeoutStopSec" not in low
    slow = dropin_text(8080, 120)
    assert "TimeoutStopSec=135s" in slow and "CAP_NET_BIND_SERVICE" not in slow


def test_unit_with_the_low_port_dropin_still_verifies_and_rates_2_or_better(unit_copy: Path) -> None:
    dropins = unit_copy.parent / "at-gateway.service.d"
    dropins.mkdir()
    (dropins / "10-from-config.conf").write_text(dropin_text(80, 60))
    out = subprocess.run([str(ANALYZE), "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    out = subprocess.run([str(ANALYZE), "security", "--offline=true", "--no-pager", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    if m is None:
        missing_tool(f"no security rating from this systemd-analyze: {out.stderr.strip()[:200]}")
    assert "CAP_NET_BIND_SERVICE" in out.stdout or float(m[1]) > 1.1  # the drop-in was read
    assert float(m[1]) <= 2.0, out.stdout


def test_unit_and_dropin_writes_that_fail_say_so(pyz: Path, tmp_path: Path) -> None:
    """install_unit and update_config_dropin run as conditions (`set -e` is off inside them): a write that
    fails must return 2 (deploy then rolls back, install-service stops) instead of passing for "changed"."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory below a regular file cannot be created, not even by root
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text(yaml.safe_dump({
        "api_key": "k", "port": 80, "providers": [{"name": "echo", "type": "echo"}],
        "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]}]}))
    script = (f'. "{REPO / "install.sh"}" && SERVICE_USER=$(id -un) BIN="{pyz}" ETC="{etc}" '
              f'UNIT_DIR="{blocker}/system" UNIT="{blocker}/system/at-gateway.service" DROPIN_DIR="{blocker}/d" '
              f'CONFIG_DROPIN="{blocker}/d/10-from-config.conf" && '
              'if install_unit; then echo unit=0; else echo unit=$?; fi && '
              'if update_config_dropin; then echo dropin=0; else echo dropin=$?; fi')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unit=2", "dropin=2"], out.stdout + out.stderr
