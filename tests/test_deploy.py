"""``install.sh deploy`` against a real OpenSSH server on 127.0.0.1, into a temporary root.

The test starts its own sshd (own config, throwaway host and client keys) and puts a
``systemctl`` stand-in first on the remote PATH: it records its calls and starts or
stops the gateway process the installed unit describes. Everything else is real: the
upload over SSH, check-config by the new binary on the server, the rename swap, the
/health polling and the rollback.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.mock_upstream import wait_until
from tests.pyz_support import PYTHON, REPO, missing_tool, repack, session_pyz

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
API_KEY = "deploy-test-key-9f2b"

# A systemctl for machines without systemd: enough of it for install.sh, acting on $AT_GATEWAY_ROOT.
STANDIN = r'''#!{python} -I
import os, shlex, signal, subprocess, sys, time
root = os.environ["AT_GATEWAY_ROOT"]
state = os.path.join(root, "standin")
os.makedirs(state, exist_ok=True)
with open(os.path.join(state, "calls.log"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
words = [a for a in sys.argv[1:] if not a.startswith("-")]
flags = [a for a in sys.argv[1:] if a.startswith("-")]
cmd = words[0] if words else "list-units"
unit_file = os.path.join(root, "etc/systemd/system/at-gateway.service")
pidfile = os.path.join(state, "main.pid")
marker = lambda name: os.path.join(state, name)

def pid():
    try:
        p = int(open(pidfile).read())
        with open(f"/proc/{{p}}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
        return p
    except (OSError, ValueError, IndexError):
        return None

def unit():
    out = {{}}
    for line in open(unit_file):
        key, sep, value = line.strip().partition("=")
        if sep and not line.startswith("#"):
            out[key] = value
    return out

def env_file(path):
    env = {{}}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith(("#", ";")) and "=" in line:
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip().strip("'\"")
    return env

def start():
    if pid():
        return
    u = unit()
    env = {{"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}}
    env.update(env_file(u.get("EnvironmentFile", "").lstrip("-")))
    sd = os.path.join(root, "var/lib", u["StateDirectory"])
    os.makedirs(sd, mode=0o700, exist_ok=True)
    env["STATE_DIRECTORY"] = sd
    log = open(os.path.join(state, "service.log"), "ab")
    p = subprocess.Popen(shlex.split(u["ExecStart"]), env=env, cwd=root, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)
    open(pidfile, "w").write(str(p.pid))
    open(marker("started"), "w").close()

def stop():
    p = pid()
    if os.path.exists(marker("started")):
        os.unlink(marker("started"))
    if not p:
        return
    os.kill(p, signal.SIGTERM)
    end = time.monotonic() + 40
    while pid() and time.monotonic() < end:
        time.sleep(0.02)
    if pid():
        os.kill(p, signal.SIGKILL)

if cmd == "daemon-reload":
    sys.exit(0)
if cmd == "reset-failed":
    if os.path.exists(marker("start-limit-hit")):
        os.unlink(marker("start-limit-hit"))
    sys.exit(0)
if cmd in ("start", "restart") and os.path.exists(marker("start-limit-hit")):
    print("Job for at-gateway.service failed: start request repeated too quickly.", file=sys.stderr)
    sys.exit(1)
if cmd == "enable":
    open(marker("enabled"), "w").close()
    sys.exit(0)
if cmd == "disable":
    if os.path.exists(marker("enabled")):
        os.unlink(marker("enabled"))
    if "--now" in flags:
        stop()
    sys.exit(0)
if cmd == "start":
    start()
elif cmd == "stop":
    stop()
elif cmd in ("restart", "try-restart"):
    if cmd == "restart" or pid():
        stop()
        start()
elif cmd == "is-active":
    ok = pid() is not None
    if "--quiet" not in flags:
        print("active" if ok else "inactive")
    sys.exit(0 if ok else 3)
elif cmd == "is-failed":
    failed = pid() is None and os.path.exists(marker("started"))
    if failed:  # systemd would have restarted it (Restart=on-failure) until StartLimitBurst, then refuse starts
        open(marker("start-limit-hit"), "w").close()
    if "--quiet" not in flags:
        print("failed" if failed else "active")
    sys.exit(0 if failed else 1)
elif cmd == "is-enabled":
    sys.exit(0 if os.path.exists(marker("enabled")) else 1)
elif cmd == "status":
    print("at-gateway.service (systemctl stand-in):", "running, pid %s" % pid() if pid() else "inactive")
    sys.exit(0 if pid() else 3)
elif cmd == "cat":
    if not os.path.exists(unit_file):
        sys.exit(1)
    print(open(unit_file).read())
else:
    print("systemctl stand-in: unsupported:", *sys.argv[1:], file=sys.stderr)
    sys.exit(1)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SSHServer:
    port: int
    user: str
    key: Path
    known_hosts: Path
    standin_dir: Path

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        return {**os.environ, "SSH_HOST": "127.0.0.1", "SSH_PORT": str(self.port), "SSH_USER": self.user,
                "SSH_KEY": str(self.key),
                "SSH_OPTS": f"-F /dev/null -o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                            "-o LogLevel=ERROR",
                "AT_GATEWAY_ROOT": str(root), "AT_GATEWAY_USER": self.user, **extra}

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                               "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                               "-i", str(self.key), "-p", str(self.port), f"{self.user}@127.0.0.1", command],
                              capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the systemctl stand-in, to put first on PATH."""
    d = tmp_path_factory.mktemp("standin-bin")
    (d / "systemctl").write_text(STANDIN.format(python=PYTHON))
    (d / "systemctl").chmod(0o755)
    return d


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, standin: Path) -> Iterator[SSHServer]:
    missing = [tool for tool in ("ssh", "ssh-keygen") if not shutil.which(tool)]
    if not os.path.isfile(SSHD) or missing:
        missing_tool("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "at-gateway-test", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    user = getpass.getuser()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    # python3 for the .pyz: the tests' own interpreter, outside any venv
    remote_path = f"{standin}:{os.path.dirname(PYTHON)}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    proc = None
    for _ in range(3):  # the port is free when chosen; retry if something takes it before sshd binds
        port = free_port()
        (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
SetEnv PATH={remote_path}
LogLevel ERROR
""")
        log = open(d / "sshd.log", "ab")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        log.close()

        def banner(port: int = port, daemon: subprocess.Popen[bytes] = proc) -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    return s.recv(8).startswith(b"SSH-")
            except OSError:
                return daemon.poll() is not None

        if wait_until(banner, 10) and proc.poll() is None:
            break
        proc.kill()
        proc.wait(5)
        proc = None
    assert proc is not None, (d / "sshd.log").read_text()
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    server = SSHServer(port, user, d / "client_key", d / "known_hosts", standin)
    try:
        where = server.ssh("command -v systemctl")
        assert where.stdout.strip() == str(standin / "systemctl"), (where, (d / "sshd.log").read_text())
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


@pytest.fixture
def remote_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "server"
    root.mkdir()
    try:
        yield root
    finally:  # whatever the test did, no gateway outlives it
        pidfile = root / "standin" / "main.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def deploy(server: SSHServer, root: Path, pyz: Path, config: Path, envfile: Path,
           **extra: str) -> subprocess.CompletedProcess[str]:
    env = server.env(root, PYZ=str(pyz), DEPLOY_CONFIG=str(config), DEPLOY_ENV=str(envfile), **extra)
    return subprocess.run(["bash", str(REPO / "install.sh"), "deploy"], env=env, capture_output=True, text=True,
                          timeout=180)


def write_config(path: Path, port: int, **top: object) -> Path:
    cfg = {"api_key": "${GATEWAY_API_KEY}", "host": "127.0.0.1", "port": port, "shutdown_timeout": "5s",
           "providers": [{"name": "echo", "type": "echo"}],
           "routes": [{"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]}], **top}
    path.write_text(yaml.safe_dump(cfg))
    return path


def local_files(tmp_path: Path) -> tuple[Path, Path, int]:
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port)
    envfile = tmp_path / "local.env"
    envfile.write_text(f"# deploy settings and server secrets\nSSH_HOST=never-sent.example\n"
                       f"export SSH_KEY=/never/sent\n  SSH_OPTS = -v\nGATEWAY_API_KEY={API_KEY}\n")
    return config, envfile, port


def chat(port: int) -> str:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"x-api-key": API_KEY}, timeout=10,
                   json={"model": "demo", "messages": [{"role": "user", "content": "still here"}]})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def version_of(binary: Path) -> str:
    return subprocess.run([PYTHON, "-I", "-S", str(binary), "version"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def calls(root: Path) -> list[str]:
    log = root / "standin" / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def main_pid(root: Path) -> int:
    return int((root / "standin" / "main.pid").read_text())


def with_commit(pyz: Path, dst: Path, commit: str) -> Path:
    return repack(pyz, dst, {"at_gateway/_build.py": f"COMMIT = {commit!r}\n".encode()})


BROKEN_MAIN = b'''\
import sys
if sys.argv[1:2] in (["check-config"], ["version"]):
    from at_gateway.cli import main
    sys.exit(main())
sys.exit("simulated crash at start-up")
'''


def test_first_deploy_upgrade_and_failed_upgrade_rolled_back(sshd: SSHServer, pyz: Path, remote_root: Path,
                                                             tmp_path: Path) -> None:
    root = remote_root
    config, envfile, port = local_files(tmp_path)
    binary = root / "usr/local/bin/at-gateway"
    etc = root / "etc/at-gateway"

    # 1. first deploy: nothing on the server yet
    out = deploy(sshd, root, pyz, config, envfile)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "first deploy" in out.stderr and "deploy finished" in out.stderr
    assert healthy(port) and chat(port) == "still here"
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    for secret in (etc / "config.yaml", etc / ".env"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    server_env = (etc / ".env").read_text()
    assert f"GATEWAY_API_KEY={API_KEY}" in server_env and "SSH_" not in server_env
    unit = (root / "etc/systemd/system/at-gateway.service").read_text()
    assert f"ExecStart={binary} serve --config {etc}/config.yaml" in unit
    assert calls(root)[:4] == ["daemon-reload", "enable at-gateway", "reset-failed at-gateway", "restart at-gateway"]
    assert not list((root / "usr/local/bin").glob("*.new")) and not list((root / "usr/local/bin").glob(".*tmp*"))
    first_pid = main_pid(root)

    # 2. upgrade: the new binary is checked, swapped in, restarted; a longer drain gets a longer stop timeout
    new = with_commit(pyz, tmp_path / "upgrade.pyz", "deploy-test-upgrade")
    write_config(config, port, shutdown_timeout="40s")
    out = deploy(sshd, root, new, config, envfile)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checking the config with the NEW binary" in out.stderr
    dropin = root / "etc/systemd/system/at-gateway.service.d/10-from-config.conf"
    assert "TimeoutStopSec=55s" in dropin.read_text()
    assert "shutdown_timeout: 40s" in (etc / "config.yaml").read_text()
    assert "deploy-test-upgrade" in version_of(binary)
    assert main_pid(root) != first_pid and healthy(port) and chat(port) == "still here"
    assert "enable at-gateway" not in calls(root)[4:]  # already installed: daemon-reload and restart
    assert "daemon-reload" in calls(root)[4:]
    assert not list(etc.glob("*.prev"))  # the replaced config (a secret) is not kept once the new one is healthy

    # 3. an upgrade with a new config and a new key that passes check-config but never becomes healthy:
    #    the previous binary, config, .env (its key) and stop timeout are all put back

    broken = repack(pyz, tmp_path / "broken.pyz", {"__main__.py": BROKEN_MAIN})
    broken = with_commit(broken, tmp_path / "broken2.pyz", "deploy-test-broken")
    write_config(config, port, shutdown_timeout="41s")
    envfile.write_text("GATEWAY_API_KEY=the-new-key-never-served\n")
    out = deploy(sshd, root, broken, config, envfile, HEALTH_TIMEOUT="20")
    assert out.returncode != 0
    assert "ROLLING BACK" in out.stderr and "is serving again" in out.stderr, out.stderr
    assert "deploy-test-upgrade" in version_of(binary)  # the previous binary is back
    assert healthy(port) and chat(port) == "still here"  # with the previous key
    assert "shutdown_timeout: 40s" in (etc / "config.yaml").read_text()
    assert f"GATEWAY_API_KEY={API_KEY}" in (etc / ".env").read_text()
    assert stat.S_IMODE((etc / ".env").stat().st_mode) == 0o600
    assert "TimeoutStopSec=55s" in dropin.read_text()
    assert "simulated crash" in (root / "standin/service.log").read_text()
    assert not (root / "usr/local/bin/at-gateway.prev").exists() and not list(etc.glob("*.prev"))


def test_config_rejected_by_the_new_binary_changes_nothing(sshd: SSHServer, pyz: Path, remote_root: Path,
                                                          tmp_path: Path) -> None:
    root = remote_root
    config, envfile, port = local_files(tmp_path)
    out = deploy(sshd, root, pyz, config, envfile)
    assert out.returncode == 0, out.stdout + out.stderr
    pid, before = main_pid(root), calls(root)
    etc = root / "etc/at-gateway"
    good_config = (etc / "config.yaml").read_bytes()

    bad = write_config(tmp_path / "bad.yaml", port, routes=[{"name": "demo", "steps": [{"provider": "nope"}]}])
    new = with_commit(pyz, tmp_path / "next.pyz", "never-installed")
    out = deploy(sshd, root, new, bad, envfile)
    assert out.returncode != 0
    assert "nothing was changed" in out.stderr and "unknown provider 'nope'" in out.stderr
    assert calls(root) == before  # the service was not touched
    assert main_pid(root) == pid and healthy(port)
    assert (etc / "config.yaml").read_bytes() == good_config
    assert "never-installed" not in version_of(root / "usr/local/bin/at-gateway")
    assert not (root / "usr/local/bin/at-gateway.new").exists()


def test_deploy_needs_ssh_host(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    out = subprocess.run(["bash", str(REPO / "install.sh"), "deploy"], env={**env, "PYZ": sys.executable},
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode != 0 and "SSH_HOST is required" in out.stderr


def test_help_lists_every_command() -> None:
    out = subprocess.run([str(REPO / "install.sh"), "help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for command in ("build", "install", "install-service", "uninstall [--purge]", "deploy", "status", "logs",
                    "test-coverage", "help"):
        assert f"  {command}" in out.stdout, command
    bad = subprocess.run(["bash", str(REPO / "install.sh"), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown command" in bad.stderr


def test_install_service_status_and_uninstall_locally(standin: Path, pyz: Path, remote_root: Path,
                                                      tmp_path: Path) -> None:
    root = remote_root
    config, envfile, port = local_files(tmp_path)
    env = {**os.environ, "PATH": f"{standin}:{os.path.dirname(PYTHON)}:{os.environ.get('PATH', '')}",
           "AT_GATEWAY_ROOT": str(root), "AT_GATEWAY_USER": getpass.getuser(), "PYZ": str(pyz),
           "DEPLOY_CONFIG": str(config), "DEPLOY_ENV": str(envfile)}

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(REPO / "install.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=120)

    etc = root / "etc/at-gateway"
    out = sh("install-service")
    assert out.returncode == 0, out.stderr
    assert healthy(port) and chat(port) == "still here"
    assert "SSH_" not in (etc / ".env").read_text()
    assert stat.S_IMODE((etc / "config.yaml").stat().st_mode) == 0o600
    assert {"enable at-gateway", "start at-gateway"} <= set(calls(root))

    # again: idempotent, and an installed config is never overwritten
    write_config(config, free_port())
    out = sh("install-service")
    assert out.returncode == 0, out.stderr
    assert "config.yaml exists: kept" in out.stderr and "is already this build" in out.stderr
    assert healthy(port)

    status = sh("status")
    assert status.returncode == 0 and "healthy" in status.stderr, status.stderr

    out = sh("uninstall")
    assert out.returncode == 0, out.stderr
    assert not healthy(port)
    assert not (root / "usr/local/bin/at-gateway").exists()
    assert not (root / "etc/systemd/system/at-gateway.service").exists()
    assert (etc / "config.yaml").exists()  # kept without --purge
    assert sh("status").returncode != 0
    out = sh("uninstall", "--purge")
    assert out.returncode == 0, out.stderr
    assert not etc.exists()
