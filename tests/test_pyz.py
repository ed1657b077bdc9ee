"""The one-file build: dist/at-gateway.pyz run as ``python3 -I -S`` (no site-packages at all)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

import build_zipapp
from at_gateway import __version__, wheels
from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of
from tests.pyz_support import PYTHON, REPO, build_pyz, pyz_cmd, pyz_process, repack, session_pyz

CRYPTO_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from at_gateway import wheels
assert wheels.install()
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
f = Fernet(Fernet.generate_key())
assert f.decrypt(f.encrypt(b"secret")) == b"secret"
import cryptography, _cffi_backend
print(cryptography.__file__)
print(_cffi_backend.__file__)
"""


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_pyz(tmp_path_factory)


def run(cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), **(env or {})}, **kw)  # type: ignore[call-overload]


def git_head() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_one_file_with_shebang_deps_inside_and_under_budget(pyz: Path) -> None:
    data = pyz.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    # "under 15 MB", decimal: the build refuses to write a larger one (build_zipapp.SIZE_BUDGET)
    assert build_zipapp.SIZE_BUDGET == 15_000_000
    assert len(data) <= build_zipapp.SIZE_BUDGET, len(data)
    assert pyz.stat().st_mode & stat.S_IXUSR
    with zipfile.ZipFile(pyz) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("_embedded/manifest.json"))
    for needed in ("__main__.py", "at_gateway/cli.py", "at_gateway/wheels.py", "at_gateway/_build.py",
                   "h11/__init__.py", "anyio/__init__.py", "idna/__init__.py", "yaml/__init__.py",
                   "typing_extensions.py", "exceptiongroup/__init__.py"):
        assert needed in names, needed
    # nothing compiled outside the embedded wheels: a zip cannot import it anyway
    assert not [n for n in names if n.endswith((".so", ".pyd")) and not n.startswith("_embedded/")]
    covered = {(s["group"], tuple(s["python"]), s["machine"]) for s in manifest["sets"]}
    for group in ("cryptography", "uvloop"):
        for minor in (10, 11, 12, 13, 14):
            for machine in ("x86_64", "aarch64"):
                assert (group, (3, minor), machine) in covered
    projects = {"cryptography": {"cryptography", "cffi"}, "uvloop": {"uvloop"}}
    for s in manifest["sets"]:
        assert {w.split("-")[0] for w in s["wheels"]} == projects[s["group"]]
        for w in s["wheels"]:  # every wheel packed: one xz stream per project and machine, no zip of zips
            assert manifest["packed"][w]["stream"] in names and f"_embedded/{w}" not in names
    assert not [n for n in names if n.endswith(".whl")]
    streams = sorted(n.removeprefix("_embedded/") for n in names if n.endswith(".xz"))
    assert [s.split("-")[0] + "-" + s.rsplit("-", 1)[1] for s in streams] == [
        f"{project}-{machine}.xz" for project in ("cffi", "cryptography", "uvloop")
        for machine in ("aarch64", "x86_64")]
    assert {w["stream"] for w in manifest["packed"].values()} == {f"_embedded/{s}" for s in streams}


def test_version_names_the_commit(pyz: Path) -> None:
    out = run(pyz_cmd(pyz, "version"))
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout
    commit = out.stdout.strip().rsplit("(", 1)[1].rstrip(")").removesuffix("-dirty")
    if git_head():  # a git checkout: the .pyz names one of its commits
        known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"])
        assert len(commit) == 12 and known.returncode == 0, out.stdout
    direct = run([str(pyz), "version"])  # through the shebang, whichever python3 is first on PATH
    assert direct.returncode == 0 and __version__ in direct.stdout, direct.stderr


def test_version_and_check_config_import_neither_server_nor_compiled_code(pyz: Path) -> None:
    heavy = ("at_gateway.http.server", "at_gateway.service", "at_gateway.http.pool", "anyio", "h11", "cryptography",
             "_cffi_backend", "cffi", "uvloop")
    for args in (["version"], ["check-config", "--config", str(REPO / "config.yaml.example")]):
        out = run([PYTHON, "-I", "-S", "-X", "importtime", str(pyz), *args])
        assert out.returncode == 0, out.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "at_gateway.cli" in imported
        assert not [m for m in imported if m.split(".")[0] in heavy or m in heavy], (args, sorted(imported))


def test_serve_chat_stream_and_sigterm_drain(pyz: Path, upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["plain"] = Reply(body=chat_completion("from the mock"))
    upstream.replies["words"] = Reply(sse=stream_of("one", "two", "three"))
    upstream.replies["slow"] = Reply(sse=stream_of(*[f"w{i}" for i in range(8)]), sse_delay=0.05)
    routes = [{"name": n, "steps": [{"provider": "up1", "model": n}]} for n in ("plain", "words", "slow")]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(upstream.url, routes)))
    h = {"x-api-key": GATEWAY_KEY}
    msg = [{"role": "user", "content": "hi"}]
    with pyz_process(pyz, config, tmp_path, env={"AT_GATEWAY_CACHE": str(tmp_path / "cache")}) as (proc, url, log):
        assert httpx.get(url + "/health").json() == {"status": "healthy"}
        r = httpx.post(url + "/v1/chat/completions", headers=h, json={"model": "plain", "messages": msg}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "from the mock"
        r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=10,
                       json={"model": "words", "stream": True, "messages": msg})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert all(w in r.text for w in ("one", "two", "three")) and r.text.endswith("data: [DONE]\n\n")
        # SIGTERM while a stream is in flight: it finishes, then the process exits 0
        with httpx.stream("POST", url + "/v1/chat/completions", headers=h, timeout=20,
                          json={"model": "slow", "stream": True, "messages": msg}) as s:
            it = s.iter_bytes()
            first = next(it)
            proc.send_signal(signal.SIGTERM)
            rest = b"".join(it)
        assert (first + rest).endswith(b"data: [DONE]\n\n") and b"w7" in first + rest
        assert proc.wait(15) == 0
        text = log.read_text()
        assert "Traceback" not in text and GATEWAY_KEY not in text
    # serving extracts uvloop (tests/test_loop.py), and nothing else: cryptography is for features that need it
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "wheels").iterdir()] == ["uvloop"]


def _interpreters() -> list[str]:
    """Every CPython >= 3.10 on this machine (the tests' own at least)."""
    found = {PYTHON}
    for pattern in ("/usr/bin/python3.1[0-9]", "/usr/local/bin/python3.1[0-9]",
                    os.path.expanduser("~/.pyenv/versions/3.1[0-9]*/bin/python3")):
        for path in glob.glob(pattern):
            if os.access(path, os.X_OK):
                found.add(os.path.realpath(path))
    return sorted(found)


@pytest.mark.parametrize("python", _interpreters())
def test_cryptography_through_the_loader(pyz: Path, python: str, tmp_path: Path) -> None:
    ver = run([python, "-I", "-S", "-c", "import sys; print(sys.version_info >= (3, 10))"])
    if ver.stdout.strip() != "True":
        pytest.skip(f"{python} is older than 3.10")
    cache = tmp_path / "cache"
    for _ in range(2):  # extract, then reuse
        out = run([python, "-I", "-S", "-c", CRYPTO_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr
        crypto_file, cffi_file = out.stdout.split()
        assert crypto_file.startswith(str(cache / "wheels")) and cffi_file.startswith(str(cache / "wheels"))
    sets = os.listdir(cache / "wheels")
    assert len(sets) == 1 and not sets[0].startswith(".tmp")
    assert not stat.S_IMODE((cache / "wheels").stat().st_mode) & 0o077
    for record in (cache / "wheels" / sets[0]).glob("*.dist-info/RECORD"):  # every file as the project shipped it
        assert_record_holds(record)
    for path in [cache, *cache.rglob("*")]:  # nothing in it another user could change before an import
        st = path.lstat()
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode), path


def assert_record_holds(record: Path) -> None:
    """Every file a wheel's RECORD lists is there with the sha256 it names (the repacking changed no byte)."""
    import base64
    import csv

    top = record.parent.parent
    rows = [row for row in csv.reader(record.read_text().splitlines()) if row and row[1]]
    assert rows, record
    for path, digest, _ in rows:
        algo, _, expected = digest.partition("=")
        got = base64.urlsafe_b64encode(hashlib.new(algo, (top / path).read_bytes()).digest()).rstrip(b"=").decode()
        assert got == expected, path


def test_concurrent_first_starts_extract_once(pyz: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(cache)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert len({out.split()[0] for out, _, _ in results}) == 1  # all use the same directory
    assert [e for e in os.listdir(cache / "wheels")] == [results[0][0].split()[0].split("/")[-3]]


def test_state_directory_is_the_cache_under_systemd(pyz: Path, tmp_path: Path) -> None:
    out = run([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(pyz)],
              env={"STATE_DIRECTORY": str(tmp_path / "state"), "HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path / "state" / "wheels"))
    assert not (tmp_path / "home").exists()


def test_unsafe_cache_falls_back_to_a_private_temporary_directory(pyz: Path, tmp_path: Path) -> None:
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    (tmp_path / "cache" / "wheels").chmod(0o777)  # others could plant code there
    out = run([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert "writable by others" in out.stderr
    assert not out.stdout.startswith(str(tmp_path))
    assert os.listdir(tmp_path / "cache" / "wheels") == []


def test_cache_below_a_directory_others_can_write_is_refused(pyz: Path, tmp_path: Path) -> None:
    # the cache itself is private, but others could rename it away and put their own in its place
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    cache = tmp_path / "open" / "cache"
    out = run([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path / 'open'} is writable by others (group or world) and not sticky" in out.stderr
    assert not out.stdout.startswith(str(tmp_path))
    assert os.listdir(cache / "wheels") == []


def test_without_a_fitting_wheel_system_cryptography_else_a_clear_message(pyz: Path, tmp_path: Path) -> None:
    bare = repack(pyz, tmp_path / "bare.pyz", {
        "_embedded/manifest.json": json.dumps({"format": 1, "wheels": {}, "sets": []}).encode(),
        **{name: None for name in zipfile.ZipFile(pyz).namelist() if name.endswith(".xz")},
    })
    env = {"AT_GATEWAY_CACHE": str(tmp_path / "cache")}
    # everything that does not need cryptography still works
    assert run(pyz_cmd(bare, "check-config", "--config", str(REPO / "config.yaml.example")), env).returncode == 0
    out = run([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(bare)], env)
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr and "no embedded wheels for it" in out.stderr
    assert "pip install cryptography" in out.stderr and "without -I/-S" in out.stderr
    # with site-packages (the venv's python), the system cryptography is used
    out = run([sys.executable, "-I", "-c", CRYPTO_CHECK, str(bare)], env)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout.split()[0]


def test_packed_wheel_not_matching_the_manifest_is_refused(pyz: Path, tmp_path: Path) -> None:
    # a well-formed xz stream whose cryptography wheel differs by one byte from what the manifest pins
    import lzma

    machine = os.uname().machine
    with zipfile.ZipFile(pyz) as zf:
        manifest = json.loads(zf.read(wheels.MANIFEST))
        [(name, where)] = [(n, w) for n, w in manifest["packed"].items()
                           if n.startswith("cryptography-") and machine in n]
        content = bytearray(lzma.decompress(zf.read(where["stream"])))
    content[where["offset"] + where["size"] // 2] ^= 0x01
    broken = repack(pyz, tmp_path / "broken.pyz", {where["stream"]: lzma.compress(bytes(content), preset=0)})
    cache = tmp_path / "cache"
    out = run([PYTHON, "-I", "-S", "-c", CRYPTO_CHECK, str(broken)], env={"AT_GATEWAY_CACHE": str(cache)})
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr
    assert f"embedded wheel {name} is corrupt (sha256" in out.stderr, out.stderr
    assert os.listdir(cache / "wheels") == []  # nothing of it kept


def test_an_oversized_build_is_refused_naming_the_biggest_entries(tmp_path: Path) -> None:
    path = tmp_path / "big.pyz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("small.py", b"x" * 10)
        zf.writestr("_embedded/huge.xz", os.urandom(4000))
    build_zipapp.check_budget(path, budget=path.stat().st_size)  # at the budget: fine
    with pytest.raises(build_zipapp.BuildError, match=r"over the 4,000-byte budget.*_embedded/huge\.xz \(4,000\)"):
        build_zipapp.check_budget(path, budget=4000)


#: Prepended to a check: this interpreter as if built without liblzma (``import lzma`` then fails).
NO_LZMA = "import sys\nsys.modules['_lzma'] = None\n"


def test_without_lzma_cryptography_fails_saying_so(pyz: Path, tmp_path: Path) -> None:
    # the wheels are xz-packed: a Python without the lzma module cannot unpack them, and must be told why
    cache = tmp_path / "cache"
    out = run([PYTHON, "-I", "-S", "-c", NO_LZMA + CRYPTO_CHECK, str(pyz)], env={"AT_GATEWAY_CACHE": str(cache)})
    assert out.returncode != 0, out.stdout
    assert "ModuleNotFoundError" in out.stderr and "no lzma module" in out.stderr, out.stderr
    assert "pip install cryptography" in out.stderr  # the usual way out (missing_message)
    assert os.listdir(cache / "wheels") == []  # no half-extracted set left behind


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    # back to back (not against the session's build) so that a commit in between cannot differ them
    one, two = build_pyz(tmp_path / "one.pyz"), build_pyz(tmp_path / "two.pyz")
    assert hashlib.sha256(one.read_bytes()).hexdigest() == hashlib.sha256(two.read_bytes()).hexdigest()
    # Two builds a second apart can agree by luck (zip times have a 2 s resolution): also check that
    # no entry carries the build's own time, only the commit's, and that the entries are sorted.
    committed = os.environ.get("SOURCE_DATE_EPOCH") or subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True, text=True).stdout.strip()
    epoch = max(int(committed), 315532800) if committed.isdigit() else 315532800  # 315532800: 1980, zip's first
    y, mo, d, h, mi, sec = time.gmtime(epoch)[:6]
    with zipfile.ZipFile(one) as zf:
        infos = zf.infolist()
    assert {i.date_time for i in infos} == {(y, mo, d, h, mi, sec - sec % 2)}
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)


def test_loader_is_inert_in_a_normal_install() -> None:
    before = list(sys.meta_path)
    assert wheels.archive_path() is None
    assert wheels.install() is False
    assert sys.meta_path == before


@pytest.mark.parametrize(("change", "reason"), [
    ({"implementation": "pypy"}, "CPython with the GIL"),
    ({"free_threaded": True}, "CPython with the GIL"),
    ({"os": "darwin"}, "64-bit Linux"),
    ({"glibc": None}, "musl"),
    ({"glibc": (2, 12)}, "glibc >= 2.17"),
    ({"machine": "riscv64"}, "no embedded wheels"),
    ({"python": (3, 9)}, "no embedded wheels"),
])
def test_wheel_selection_refuses_what_does_not_fit(pyz: Path, change: dict[str, object], reason: str) -> None:
    manifest = json.loads(zipfile.ZipFile(pyz).read("_embedded/manifest.json"))
    plat = {"implementation": "cpython", "python": (3, 12), "free_threaded": False, "os": "linux",
            "machine": "aarch64", "bits": 64, "glibc": (2, 31)}
    for group in ("cryptography", "uvloop"):
        chosen = wheels.select(manifest, plat, group)
        assert chosen.key == f"{group}-cp312-aarch64" and any("cp312" in w for w in chosen.wheels)
        projects = {"uvloop"} if group == "uvloop" else {"cryptography", "cffi"}
        assert {w.split("-")[0] for w in chosen.wheels} == projects
        with pytest.raises(wheels.WheelError, match=reason):
            wheels.select(manifest, {**plat, **change}, group)


def test_cache_directory_order(tmp_path: Path) -> None:
    home = os.path.expanduser("~")
    assert wheels.cache_root({"AT_GATEWAY_CACHE": "/a", "STATE_DIRECTORY": "/b"}) == Path("/a")
    assert wheels.cache_root({"STATE_DIRECTORY": "/b:/c"}) == Path("/b")
    assert wheels.cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/at-gateway")
    assert wheels.cache_root({}) == Path(home) / ".cache" / "at-gateway"


def _old_interpreter() -> str | None:
    for pattern in ("/usr/bin/python3.[6-9]", os.path.expanduser("~/.pyenv/versions/3.[6-9].*/bin/python3")):
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.X_OK):
                return path
    return None


@pytest.mark.skipif(_old_interpreter() is None, reason="no Python older than 3.10 on this machine")
def test_too_old_python_gets_a_plain_message(pyz: Path) -> None:
    old = _old_interpreter()
    assert old
    out = run([old, str(pyz), "version"])
    assert out.returncode == 1 and "needs Python 3.10 or newer" in out.stderr and "Traceback" not in out.stderr
