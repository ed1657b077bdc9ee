"""The .pyz's wheel cache must never let another local user plant code that we then import.

Python imports submodules by path long after the cache was checked, so a directory on the way
to the extracted set that someone else can rename, replace or write into lets them swap the set
after the check. Here a real second user (``atgw-other``, created when the tests run as root)
tries exactly that against each kind of unsafe layout: the cache must be refused in favour of a
private temporary directory, and the module imported must be ours, not the planted one.

A tiny archive (one pure-Python wheel with a manifest, built here) stands in for the .pyz: the
checks do not depend on what the wheels contain.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from at_gateway import wheels
from tests.pyz_support import PYTHON, REPO, missing_tool

OTHER = "atgw-other"
PROBE = "atgw_probe"
PROBE_WHEEL = "atgw_probe-1.0-py3-none-any.whl"

IMPORT_PROBE = f"""
import sys
sys.path.insert(0, sys.argv[1])
import {PROBE}
print({PROBE}.WHO)
"""

#: Run as the other user: replace ``victim`` (rename it away, or unlink it if a symlink) with a tree of
#: their own holding a planted probe at ``victim/rest``; or overwrite one file of an extracted set.
ATTACK = f"""
import os, sys
mode, victim = sys.argv[1], sys.argv[2]
try:
    if mode == "swap":
        if os.path.islink(victim):
            os.unlink(victim)
        else:
            os.rename(victim, victim + ".old")
        pkg = os.path.join(victim, sys.argv[3], "{PROBE}")
        os.makedirs(pkg)
        target = os.path.join(pkg, "__init__.py")
    else:
        target = victim
        if mode == "replace":
            os.unlink(target)
    with open(target, "w") as f:
        f.write('WHO = "planted"\\n')
except OSError as exc:
    print("refused:", exc)
else:
    print("planted")
"""

#: Run as the other user: the whole hook path, with the cache given by $AT_GATEWAY_CACHE.
ACTIVATE = f"""
import json, sys
sys.path.insert(0, sys.argv[1])
from at_gateway import wheels
d = wheels.activate(sys.argv[2])
assert sys.path[0] == str(d), (sys.path[0], d)
import {PROBE}
print(json.dumps({{"dir": str(d), "who": {PROBE}.WHO, "file": {PROBE}.__file__}}))
"""


@dataclass
class Other:
    """The second unprivileged user, and an interpreter it can run."""

    uid: int
    gid: int
    python: str

    def run(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.python, "-I", "-S", *args], capture_output=True, text=True, timeout=30,
                              user=self.uid, group=self.gid, extra_groups=[], cwd="/",
                              env={"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent", **(env or {})})


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or ("/usr/sbin/useradd" if os.path.exists("/usr/sbin/useradd") else None)
    if useradd is None:
        missing_tool("useradd not found: cannot create a second user to attack the wheel cache with")
    proc = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
                          capture_output=True, text=True, timeout=30)
    try:  # exit 9: created meanwhile by a concurrent run
        return pwd.getpwnam(OTHER)
    except KeyError:
        missing_tool(f"useradd {OTHER} failed ({proc.returncode}): {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def other() -> Other:
    """``atgw-other``: a system user without home or shell, left in place (concurrent runs share it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a second user is created with useradd and files are chowned to it")
    entry = _ensure_user()
    for python in (PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([python, "-I", "-S", "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                   capture_output=True, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                                   cwd="/", timeout=30)
        except OSError:  # missing, or under a directory the user cannot enter
            continue
        if probe.returncode == 0:
            return Other(entry.pw_uid, entry.pw_gid, python)
    pytest.skip(f"no Python >= 3.10 that {OTHER} can run (the tests' own sits under a private directory)")


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp: safe itself, and one the other user can walk into."""
    path = Path(tempfile.mkdtemp(prefix="atgw-wheels-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def archive(base: Path) -> Path:
    """The stand-in .pyz: a manifest and one wheel with a package, for every Python 3.10-3.14 here."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{PROBE}/__init__.py", 'WHO = "genuine"\n')
        zf.writestr(f"{PROBE}/sub/__init__.py", "")
        zf.writestr("atgw_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: atgw-probe\nVersion: 1.0\n")
    data = buf.getvalue()
    machine = os.uname().machine
    manifest = {"format": 1, "wheels": {PROBE_WHEEL: hashlib.sha256(data).hexdigest()},
                "sets": [{"key": f"cp3{m}-{machine}", "python": [3, m], "machine": machine, "glibc": [2, 17],
                          "wheels": [PROBE_WHEEL]} for m in range(10, 15)]}
    path = base / "probe.pyz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(wheels.MANIFEST, json.dumps(manifest))
        zf.writestr(f"{wheels.EMBED_DIR}/{PROBE_WHEEL}", data)
    path.chmod(0o644)
    return path


def extract(archive: Path, root: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(wheels.MANIFEST))
        wset = wheels.select(manifest, wheels.current_platform())
        return wheels.extract_cached(zf, manifest, wset, root)


def set_name(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        wset = wheels.select(json.loads(zf.read(wheels.MANIFEST)), wheels.current_platform())
    return f"{wset.key}-{wset.digest[:16]}"


def imported(directory: Path) -> str:
    out = subprocess.run([PYTHON, "-I", "-S", "-c", IMPORT_PROBE, str(directory)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def assert_immutable_to_others(directory: Path, uid: int) -> None:
    """Every directory and file of an extracted set: ours, no symlink, not writable by group or others."""
    for path in [directory, *directory.rglob("*")]:
        st = path.lstat()
        assert not stat.S_ISLNK(st.st_mode), path
        assert st.st_uid == uid and not st.st_mode & 0o022, (path, st.st_uid, oct(st.st_mode))


def is_under(path: Path, directory: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


# Each layout returns (the cache root, what the other user replaces to swap the set after the check).
def _their_parent(base: Path, o: Other) -> tuple[Path, Path]:
    d = base / "theirs"
    d.mkdir()
    os.chown(d, o.uid, o.gid)
    return d / "cache", d / "cache"


def _their_cache_root(base: Path, o: Other) -> tuple[Path, Path]:
    d = base / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, o.uid, o.gid)
    return d, d / "wheels"


def _open_parent(base: Path, o: Other) -> tuple[Path, Path]:
    d = base / "open"
    d.mkdir()
    d.chmod(0o777)  # no sticky bit: anyone may rename what is inside
    return d / "cache", d / "cache"


def _group_writable_parent(base: Path, o: Other) -> tuple[Path, Path]:
    d = base / "shared"
    d.mkdir()
    os.chown(d, 0, o.gid)
    d.chmod(0o775)
    return d / "cache", d / "cache"


def _open_grandparent(base: Path, o: Other) -> tuple[Path, Path]:
    # a root-owned 0755 directory is no barrier when its own parent lets others rename it
    d = base / "open"
    d.mkdir()
    d.chmod(0o777)
    (d / "mid").mkdir(mode=0o755)
    return d / "mid" / "cache", d / "mid"


def _their_symlink_in_sticky_dir(base: Path, o: Other) -> tuple[Path, Path]:
    sticky = base / "tmp-like"
    sticky.mkdir()
    sticky.chmod(0o1777)
    target = base / "target"
    target.mkdir(mode=0o700)
    link = sticky / "link"
    link.symlink_to(target)
    os.lchown(link, o.uid, o.gid)  # in a sticky directory its owner may remove and re-point it
    return link / "cache", link


UNSAFE = {  # layout, and the start of the reason logged
    "parent owned by another user": (_their_parent, "theirs is owned by another user"),
    "cache root owned by another user": (_their_cache_root, "theirs is owned by another user"),
    "parent writable by others, not sticky": (_open_parent, "open is writable by others"),
    "parent writable by another user's group": (_group_writable_parent, "shared is writable by others"),
    "root-owned parent inside a directory writable by others": (_open_grandparent, "open is writable by others"),
    "symlink owned by another user": (_their_symlink_in_sticky_dir, "tmp-like/link is owned by another user"),
}


@pytest.mark.parametrize(("layout", "reason"), list(UNSAFE.values()), ids=list(UNSAFE))
def test_unsafe_directory_above_the_set_is_refused(layout: Callable[[Path, Other], tuple[Path, Path]], reason: str,
                                                   other: Other, base: Path, archive: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root, victim = layout(base, other)
    with caplog.at_level(logging.WARNING, "at_gateway.wheels"):
        directory = extract(archive, root)
    # what the other user can do once we checked: replace the path to the set with their own tree
    rest = os.path.relpath(root / "wheels" / set_name(archive), victim)
    attack = other.run(["-c", ATTACK, "swap", str(victim), rest])
    assert attack.returncode == 0 and attack.stdout.strip() == "planted", attack.stdout + attack.stderr
    assert imported(directory) == "genuine"
    assert not is_under(directory, base)
    assert [r for r in caplog.records if "unusable" in r.getMessage() and f"{base}/{reason}" in r.getMessage()], \
        caplog.text
    assert_immutable_to_others(directory, os.geteuid())


def _writable_package(set_dir: Path, o: Other) -> tuple[str, Path]:
    (set_dir / PROBE).chmod(0o777)  # others may unlink our __init__.py and write their own
    return "replace", set_dir / PROBE / "__init__.py"


def _writable_file(set_dir: Path, o: Other) -> tuple[str, Path]:
    (set_dir / PROBE / "__init__.py").chmod(0o666)
    return "write", set_dir / PROBE / "__init__.py"


def _their_file(set_dir: Path, o: Other) -> tuple[str, Path]:
    os.chown(set_dir / PROBE / "__init__.py", o.uid, o.gid)
    return "write", set_dir / PROBE / "__init__.py"


TAMPERABLE = {  # how the set is weakened, and the start of the reason logged
    "package directory writable by others": (_writable_package, f"{PROBE} is writable by others"),
    "file writable by others": (_writable_file, "__init__.py is writable by others"),
    "file owned by another user": (_their_file, "__init__.py is not owned by this user"),
}


@pytest.mark.parametrize(("weaken", "reason"), list(TAMPERABLE.values()), ids=list(TAMPERABLE))
def test_existing_set_others_could_change_is_refused(weaken: Callable[[Path, Other], tuple[str, Path]], reason: str,
                                                      other: Other, base: Path, archive: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = base / "cache"
    first = extract(archive, root)
    assert is_under(first, root) and imported(first) == "genuine"
    for d in (root, root / "wheels", first):
        d.chmod(0o755)  # readable by all, as a shared cache may be: still nobody else's to change
    mode, target = weaken(first, other)
    attack = other.run(["-c", ATTACK, mode, str(target)])
    assert attack.stdout.strip() == "planted", attack.stdout + attack.stderr
    with caplog.at_level(logging.WARNING, "at_gateway.wheels"):
        second = extract(archive, root)
    assert imported(second) == "genuine"
    assert not is_under(second, base)
    assert [r for r in caplog.records if "unusable" in r.getMessage() and reason in r.getMessage()], caplog.text


def _under_sticky_dir(base: Path) -> Path:
    sticky = base / "tmp-like"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add entries but not touch ours
    return sticky / "cache"


def _own_symlink(base: Path) -> Path:
    (base / "real").mkdir(mode=0o700)
    (base / "link").symlink_to(base / "real")
    return base / "link" / "cache"


SAFE = {
    "private cache in a safe directory": lambda base: base / "cache",
    "private cache under a root-owned sticky directory": _under_sticky_dir,
    "private cache through our own symlink": _own_symlink,
}


@pytest.mark.parametrize("layout", list(SAFE.values()), ids=list(SAFE))
def test_safe_cache_is_used_and_kept_out_of_reach(layout: Callable[[Path], Path], other: Other, base: Path,
                                                  archive: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = layout(base)
    with caplog.at_level(logging.WARNING, "at_gateway.wheels"):
        directory = extract(archive, root)
        again = extract(archive, root)
    assert directory == again and is_under(directory, root)
    assert not caplog.records, caplog.text
    assert_immutable_to_others(directory, os.geteuid())
    rest = os.path.relpath(root / "wheels" / set_name(archive), root)
    attack = other.run(["-c", ATTACK, "swap", str(root), rest])
    assert attack.stdout.startswith("refused:"), attack.stdout + attack.stderr
    assert imported(directory) == "genuine"


def test_extraction_is_immutable_to_others_whatever_the_umask(tmp_path: Path, archive: Path) -> None:
    old = os.umask(0)
    try:
        directory = extract(archive, tmp_path / "cache")
    finally:
        os.umask(old)
    assert is_under(directory, tmp_path / "cache")
    assert_immutable_to_others(directory, os.geteuid())
    for path in (tmp_path / "cache", tmp_path / "cache" / "wheels"):
        assert not path.stat().st_mode & 0o077, path


def test_fallback_avoids_an_unsafe_tmpdir(base: Path, archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = base / "cache"
    (root / "wheels").mkdir(parents=True)
    (root / "wheels").chmod(0o777)  # refused: the set would go to the temporary directory instead
    unsafe_tmp = base / "open"
    unsafe_tmp.mkdir()
    unsafe_tmp.chmod(0o777)  # writable by others, not sticky: no better than the cache
    monkeypatch.setenv("TMPDIR", str(unsafe_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # as in a fresh process: tempfile caches its first choice
    directory = extract(archive, root)
    assert not is_under(directory, base)
    assert_immutable_to_others(directory, os.geteuid())
    assert imported(directory) == "genuine"


def _as_other_own_dir(base: Path, o: Other) -> Path:
    d = base / "mine"
    d.mkdir(mode=0o700)
    os.chown(d, o.uid, o.gid)
    return d / "cache"


def _as_other_root_owned_root(base: Path, o: Other) -> Path:
    # the cache root belongs to root (trusted), its wheels directory to the user
    root = base / "state"
    root.mkdir(mode=0o755)
    (root / "wheels").mkdir(mode=0o700)
    os.chown(root / "wheels", o.uid, o.gid)
    return root


def _as_other_third_users_parent(base: Path, o: Other) -> Path:
    d = base / "third"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)  # neither the user nor root: its owner could swap what is inside
    (d / "mine").mkdir(mode=0o700)
    os.chown(d / "mine", o.uid, o.gid)
    return d / "mine" / "cache"


def _as_other_own_open_dir(base: Path, o: Other) -> Path:
    d = base / "mine"
    d.mkdir()
    d.chmod(0o777)
    os.chown(d, o.uid, o.gid)
    return d / "cache"


AS_OTHER = {
    "own private directory: used": (_as_other_own_dir, True),
    "root-owned cache root: used": (_as_other_root_owned_root, True),
    "parent owned by a third user: refused": (_as_other_third_users_parent, False),
    "own directory writable by others: refused": (_as_other_own_open_dir, False),
}


@pytest.mark.parametrize(("layout", "used"), list(AS_OTHER.values()), ids=list(AS_OTHER))
def test_unprivileged_user_through_the_hook(layout: Callable[[Path, Other], Path], used: bool, other: Other,
                                            base: Path, archive: Path) -> None:
    root = layout(base, other)
    unsafe_tmp = base / "open-tmp"
    unsafe_tmp.mkdir()
    unsafe_tmp.chmod(0o777)
    out = other.run(["-c", ACTIVATE, str(REPO), str(archive)],
                    env={"AT_GATEWAY_CACHE": str(root), "TMPDIR": str(unsafe_tmp)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["who"] == "genuine"
    directory = Path(result["dir"])
    if used:
        assert is_under(directory, root) and "unusable" not in out.stderr, out.stderr
        assert_immutable_to_others(directory, other.uid)
    else:
        assert not is_under(directory, base) and "unusable" in out.stderr, (directory, out.stderr)
    assert not any(unsafe_tmp.iterdir())
