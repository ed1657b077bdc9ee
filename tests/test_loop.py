"""The event loop: uvloop from the .pyz where a wheel fits, asyncio where it cannot be had, said once at start.

The .pyz runs under ``python3 -I -S`` (what users deploy), so uvloop can only come from the wheels
it embeds; where they cannot be used (no wheel fits, nowhere to extract them) ``loop: auto`` must
still serve, on asyncio, with one warning naming the reason, and ``loop: uvloop`` must refuse to
start with that reason instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from at_gateway import service, wheels
from at_gateway.errors import ConfigError
from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, chat_completion, wait_until
from tests.pyz_support import PYTHON, log_records, log_text, missing_tool, pyz_cmd, pyz_process, repack, session_pyz
from tests.test_pyz import _interpreters, run
from tests.test_service import gateway_process

#: uvloop through the .pyz's loader, doing real work: TCP both ways and a subprocess.
UVLOOP_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from at_gateway import wheels
assert wheels.install()
import asyncio, uvloop

async def main():
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"ping")
    writer.write_eof()
    assert await reader.read() == b"ping"
    writer.close()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-S", "-c", "print(6 * 7)",
                                                stdout=asyncio.subprocess.PIPE)
    assert (await proc.communicate())[0].strip() == b"42"
    server.close()
    await server.wait_closed()
    return type(asyncio.get_running_loop())

print(uvloop.run(main()).__module__)
print(uvloop.__file__)
"""


UVLOOP_LINE = re.compile(r"event loop: uvloop \d+\.\d+\.\d+ \(loop: auto\)")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


def write_config(tmp_path: Path, upstream: MockUpstream, loop: str = "auto") -> Path:
    upstream.replies["m"] = Reply(body=chat_completion("on whichever loop"))
    cfg = base_config(upstream.url, [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}])
    cfg["loop"] = loop
    path = tmp_path / f"config-{loop}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=10,
                   json={"model": "r", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "on whichever loop", r.text


def loop_lines(log: Path) -> list[dict]:
    return [r for r in log_records(log.read_text()) if log_text(r).startswith("event loop:")]


def warnings_of(log: Path) -> list[str]:
    """Warnings and errors, but the in-memory store's notice: these configs choose ``store: :memory:``."""
    return [log_text(r) for r in log_records(log.read_text()) if r.get("level") in ("warning", "error")
            and not log_text(r).startswith("store: in memory")]


def mapped_uvloop(pid: int) -> list[str]:
    """The uvloop extension files the process has mapped: the loop is really loaded, and from where."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "/uvloop/loop." in line})


@pytest.mark.parametrize("python", _interpreters())
def test_uvloop_through_the_loader(pyz: Path, python: str, tmp_path: Path) -> None:
    ver = run([python, "-I", "-S", "-c", "import sys; print(sys.version_info >= (3, 10))"])
    if ver.stdout.strip() != "True":
        pytest.skip(f"{python} is older than 3.10")
    cache = tmp_path / "cache"
    for _ in range(2):  # extract, then reuse
        out = run([python, "-I", "-S", "-c", UVLOOP_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr
        loop_module, uvloop_file = out.stdout.split()
        assert loop_module == "uvloop" and uvloop_file.startswith(str(cache / "wheels"))
    # one set, of uvloop alone: serving does not extract cryptography
    sets = os.listdir(cache / "wheels")
    assert len(sets) == 1 and sets[0].startswith("uvloop-cp3"), sets
    for path in [cache, *cache.rglob("*")]:  # the same safe-cache rules as for cryptography
        st = path.lstat()
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o022, path


def test_pyz_serves_on_uvloop_and_says_so(pyz: Path, upstream: MockUpstream, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pyz_process(pyz, write_config(tmp_path, upstream), tmp_path, env={"AT_GATEWAY_CACHE": str(cache)}) as (
            proc, url, log):
        chat(url)
        lines = loop_lines(log)
        assert len(lines) == 1 and UVLOOP_LINE.fullmatch(log_text(lines[0])), log.read_text()
        assert lines[0]["level"] == "info"
        assert warnings_of(log) == []
        so = mapped_uvloop(proc.pid)
        assert len(so) == 1 and so[0].startswith(str(cache / "wheels" / "uvloop-cp3")), so
    assert not [p for p in cache.rglob("cryptography")], "serving extracted cryptography too"


def test_cache_unwritable_serves_on_uvloop_from_a_temporary_directory(pyz: Path, upstream: MockUpstream,
                                                                       tmp_path: Path) -> None:
    # Not a directory at all (ENOTDIR even for root): the set goes to a private directory under /tmp.
    (tmp_path / "file").write_text("not a directory")
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "file" / "cache")}
    with pyz_process(pyz, write_config(tmp_path, upstream), tmp_path, env=env) as (proc, url, log):
        chat(url)
        [line] = loop_lines(log)
        assert UVLOOP_LINE.fullmatch(log_text(line)), log.read_text()
        [warning] = warnings_of(log)
        assert "unusable" in warning and "Not a directory" in warning and "temporary directory" in warning
        [so] = mapped_uvloop(proc.pid)
        assert "/at-gateway-wheels-" in so
        proc.terminate()
        assert proc.wait(15) == 0
    assert not Path(so).exists(), "the temporary set is removed at exit"


READ_ONLY = 'mount --bind -o ro /tmp /tmp && mount --bind -o ro /var/tmp /var/tmp && exec "$@"'


def read_only_wrap() -> list[str]:
    """Run the gateway in a mount namespace where /tmp and /var/tmp (the cache under tmp_path too) are read-only.

    A read-only mount is what stops root (the tests run as root, and root ignores file modes): the
    state directory of a ``ProtectSystem=strict`` unit without ``StateDirectory``, say.
    """
    if shutil.which("unshare") is None:
        missing_tool("unshare not found: cannot make a read-only cache")
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY, "sh"]
    probe = subprocess.run([*wrap, "sh", "-c", "! touch /tmp/.at-gateway-ro-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing_tool(f"cannot make /tmp read-only in a mount namespace here: {probe.stderr.strip()[:200]}")
    return wrap


def test_read_only_cache_and_tmp_serve_on_asyncio_with_one_warning(pyz: Path, upstream: MockUpstream,
                                                                    tmp_path: Path) -> None:
    wrap = read_only_wrap()
    (tmp_path / "state").mkdir()
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "state")}
    with pyz_process(pyz, write_config(tmp_path, upstream), tmp_path, env=env, wrap=wrap) as (proc, url, log):
        chat(url)
        [warning] = warnings_of(log)
        assert warning.startswith("event loop: asyncio; uvloop unavailable:"), warning
        assert "Read-only file system" in warning and str(tmp_path / "state" / "wheels") in warning
        assert [log_text(r) for r in loop_lines(log)] == [warning]
        assert mapped_uvloop(proc.pid) == []
        assert "Traceback" not in log.read_text()
    assert os.listdir(tmp_path / "state") == []
    # loop: uvloop asks for it explicitly: a clear start-up error with the same reason, exit 1
    config = write_config(tmp_path, upstream, loop="uvloop")
    out = subprocess.run([*wrap, *pyz_cmd(pyz, "serve", "--config", str(config), "--port", "0")], env={
        "PATH": os.environ.get("PATH", ""), **env}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert "loop: uvloop cannot be used here" in out.stderr and "Read-only file system" in out.stderr
    assert "Traceback" not in out.stderr and "listening on" not in out.stderr


def without_uvloop(pyz: Path, dst: Path) -> Path:
    """The .pyz as if built for other machines: its manifest has no uvloop set for this one."""
    with zipfile.ZipFile(pyz) as zf:
        manifest = json.loads(zf.read(wheels.MANIFEST))
    manifest["sets"] = [s for s in manifest["sets"] if s["group"] != "uvloop"]
    return repack(pyz, dst, {wheels.MANIFEST: json.dumps(manifest).encode()})


def test_no_fitting_wheel_falls_back_once_and_loop_uvloop_refuses(pyz: Path, upstream: MockUpstream,
                                                                  tmp_path: Path) -> None:
    bare = without_uvloop(pyz, tmp_path / "bare.pyz")
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "cache")}
    with pyz_process(bare, write_config(tmp_path, upstream), tmp_path, env=env) as (proc, url, log):
        chat(url)
        [warning] = warnings_of(log)
        assert warning.startswith("event loop: asyncio; uvloop unavailable:") and "no embedded wheels for it" in warning
    out = run(pyz_cmd(bare, "serve", "--config", str(write_config(tmp_path, upstream, "uvloop")), "--port", "0"), env)
    assert out.returncode == 1 and "loop: uvloop cannot be used here" in out.stderr, out.stderr
    assert "no embedded wheels for it" in out.stderr and "Traceback" not in out.stderr
    # loop: asyncio never looks for uvloop at all
    with pyz_process(pyz, write_config(tmp_path, upstream, "asyncio"), tmp_path, env=env) as (proc, url, log):
        chat(url)
        assert [log_text(r) for r in loop_lines(log)] == ["event loop: asyncio (loop: asyncio)"]
        assert mapped_uvloop(proc.pid) == []


def test_corrupt_uvloop_stream_leaves_cryptography_usable(pyz: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        stream = next(n for n in zf.namelist()
                      if n.startswith("_embedded/uvloop-") and n.endswith(f"-{os.uname().machine}.xz"))
        data = bytearray(zf.read(stream))
    data[len(data) // 2] ^= 0xFF
    broken = repack(pyz, tmp_path / "broken.pyz", {stream: bytes(data)})
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "cache")}
    out = run([PYTHON, "-I", "-S", "-c", UVLOOP_CHECK, str(broken)], env)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "corrupt" in out.stderr, out.stderr
    script = f"import sys; sys.path.insert(0, {str(broken)!r}); from at_gateway import wheels; wheels.install(); " \
             "from cryptography.fernet import Fernet; print(Fernet.generate_key() and 'ok')"
    out = run([PYTHON, "-I", "-S", "-c", script], env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")], "no half-extracted set left behind"


#: The loop choice as ``serve`` makes it, in an interpreter without the lzma module (see tests/test_pyz.py).
CHOOSE_WITHOUT_LZMA = """
import sys
sys.modules["_lzma"] = None
sys.path.insert(0, sys.argv[1])
from at_gateway import service, wheels
from at_gateway.errors import ConfigError
assert wheels.install()
chosen = service.choose_loop("auto")
print(chosen.name, chosen.level)
print(chosen.note)
try:
    service.choose_loop("uvloop")
except ConfigError as exc:
    print(exc.render())
"""


def test_without_lzma_auto_serves_on_asyncio_and_uvloop_refuses(pyz: Path, tmp_path: Path) -> None:
    out = run([PYTHON, "-I", "-S", "-c", CHOOSE_WITHOUT_LZMA, str(pyz)], {"AT_GATEWAY_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    chosen, note, refusal = out.stdout.split("\n", 2)
    assert chosen == f"asyncio {logging.WARNING}"
    assert note.startswith("event loop: asyncio; uvloop unavailable:") and "no lzma module" in note, note
    assert "loop: uvloop cannot be used here" in refusal and "no lzma module" in refusal, refusal
    assert os.listdir(tmp_path / "cache" / "wheels") == []


def test_choose_loop_in_a_normal_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert service.choose_loop("asyncio") == service.EventLoop("asyncio", {}, "event loop: asyncio (loop: asyncio)")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed (the venv may have it for `make bench`)
    auto = service.choose_loop("auto")
    assert auto.name == "asyncio" and auto.options == {} and auto.level == logging.INFO  # an extra not installed
    assert "pip install 'at-gateway[uvloop]'" in auto.note
    with pytest.raises(ConfigError, match="loop: uvloop cannot be used here") as info:
        service.choose_loop("uvloop", "gw.yaml")
    assert info.value.render().startswith("gw.yaml: 1 problem(s)")


def test_workers_say_it_once(upstream: MockUpstream, tmp_path: Path) -> None:
    cfg = base_config(upstream.url, [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}])
    cfg["workers"] = 2
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        assert len(loop_lines(logfile)) == 1, logfile.read_text()
        proc.terminate()
        assert proc.wait(15) == 0
