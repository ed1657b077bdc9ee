"""Compiled dependencies for the one-file build (``at-gateway.pyz``).

Python cannot import a compiled extension from inside a zip file, so the .pyz
carries the manylinux wheels of ``cryptography``, ``cffi`` and ``uvloop`` with a
manifest: those of one project and machine packed into one xz stream
(``_embedded/<project>-<version>-<machine>.xz``; uvloop's slimmed, see
build_zipapp.py), each checked against its sha256 in the manifest before use.
(A plain ``_embedded/<wheel>.whl`` member, the manifest without a ``packed``
entry for it, is read as is.)
:func:`install` puts a small import hook in front of ``sys.meta_path``; the first
import of a module of a group (:data:`GROUPS`: ``cryptography``/``cffi``, or
``uvloop``) extracts that group's wheels fitting this interpreter and machine
into a versioned cache directory and puts it on ``sys.path``. Nothing happens
before that import, so ``version`` and ``check-config`` never pay for it; serving
imports uvloop (``loop: auto``), a Vertex service account cryptography.

The cache directory is ``$AT_GATEWAY_CACHE``, else systemd's
``$STATE_DIRECTORY``, else ``$XDG_CACHE_HOME/at-gateway`` (``~/.cache/at-gateway``).
Each set of wheels is extracted into a temporary directory beside its final
place and renamed into it in one step, so two processes starting at once never
see a half-written set: the loser of the race throws its copy away. The set is
used only while no other local user can change it or any directory on the way to
it (imports read it by path long after the check); otherwise it goes to a private
temporary directory instead (:func:`extract_cached`).

Where no embedded wheel fits (another OS, CPU, libc or Python), a system
``cryptography`` (or ``uvloop``) is used if importable; if none is, the import
fails with a message saying why and how to get one (for uvloop, the service
then runs on asyncio and says so). From a normal install (not a zip)
:func:`install` does nothing at all.
"""

from __future__ import annotations

import os
import stat
import sys
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the rest is imported when the hook fires: `version` stays cheap
    import zipfile
    from collections.abc import Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from pathlib import Path, PurePosixPath

#: Where build_zipapp.py puts the wheels and their manifest inside the .pyz.
EMBED_DIR = "_embedded"
MANIFEST = f"{EMBED_DIR}/manifest.json"
#: Wheel groups (as build_zipapp.py makes them), each with the top-level modules whose first import
#: extracts that group: one group's failure (say, a corrupt uvloop stream) leaves the other usable.
GROUPS = (("cryptography", frozenset({"cryptography", "cffi", "_cffi_backend"})), ("uvloop", frozenset({"uvloop"})))
#: Top-level modules whose import triggers an extraction.
WATCHED = frozenset().union(*(modules for _, modules in GROUPS))
#: Written last into a finished extraction; its absence means "not ours, not complete".
MARKER = ".at-gateway-wheels"
#: Extractions that crashed half-way are removed after this long.
STALE_TMP_SECONDS = 3600.0
#: Sets of other builds unused for this long are removed (they are re-extracted if needed again).
STALE_SET_SECONDS = 7 * 86400.0


class WheelError(Exception):
    """The embedded wheels cannot be used here; the message says why."""


class WheelSet:
    """The wheels one interpreter/machine pair needs, as listed in the manifest."""

    def __init__(self, key: str, wheels: tuple[str, ...], digest: str, group: str = "cryptography") -> None:
        self.key = key  # e.g. "uvloop-cp311-x86_64"
        self.wheels = wheels
        self.digest = digest  # sha256 over the wheels' own sha256s: the cache directory's version
        self.group = group


def archive_path() -> str | None:
    """The .pyz this module was imported from, or None for a normal install."""
    loader = globals().get("__loader__")
    archive = getattr(loader, "archive", None)  # only zipimport.zipimporter has it
    return archive if isinstance(archive, str) else None


def install() -> bool:
    """Arm the import hook when running from a .pyz with embedded wheels; return whether it was armed."""
    archive = archive_path()
    if archive is None:
        return False
    if any(isinstance(f, EmbeddedWheelFinder) for f in sys.meta_path):
        return True
    sys.meta_path.insert(0, EmbeddedWheelFinder(archive))
    return True


def group_of(module: str) -> str | None:
    """The wheel group whose extraction the import of top-level ``module`` triggers, if any."""
    for group, modules in GROUPS:
        if module in modules:
            return group
    return None


class EmbeddedWheelFinder:
    """A meta path finder that only reacts to the first import of a watched module (once per group)."""

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self.activated: set[str] = set()  # groups tried, successfully or not
        self.directories: dict[str, Path] = {}
        self.reasons: dict[str, str] = {}  # why a group's embedded wheels are not in use

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        if path is not None or fullname not in WATCHED:
            return None
        group = group_of(fullname) or fullname
        if group not in self.activated:
            self.activated.add(group)
            try:
                self.directories[group] = activate(self.archive, group)
            except WheelError as exc:
                self.reasons[group] = str(exc)
        spec = PathFinder.find_spec(fullname)
        if spec is None:
            raise ModuleNotFoundError(missing_message(fullname, self.reasons.get(group)), name=fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass


def missing_message(module: str, reason: str | None) -> str:
    """Tell the operator how to get cryptography (or uvloop) when neither an embedded nor a system one works."""
    why = f" ({reason})" if reason else ""
    if group_of(module) == "uvloop":
        return (f"No module named {module!r}: the .pyz carries uvloop for CPython 3.10-3.14 on Linux "
                f"x86_64/aarch64 with glibc, but cannot use it here{why}")
    return (
        f"No module named {module!r}: this feature needs the 'cryptography' package. The .pyz carries it "
        f"for CPython 3.10-3.14 on Linux x86_64/aarch64 with glibc, but cannot use it here{why}. "
        "Install it for this Python (your distribution's python3-cryptography, or 'pip install cryptography') "
        "and start the .pyz without -I/-S so that site-packages is searched, or install at-gateway "
        "with pip instead of using the .pyz."
    )


def activate(archive: str, group: str = "cryptography") -> Path:
    """Extract (once) the group's wheel set fitting this interpreter and put it first on sys.path."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = json.loads(zf.read(MANIFEST))
            wset = select(manifest, current_platform(), group)
            directory = extract_cached(zf, manifest, wset, cache_root())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WheelError(f"cannot use the embedded wheels: {exc}") from None
    entry = str(directory)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    return directory


def current_platform() -> dict[str, Any]:
    """What decides whether an embedded wheel fits: implementation, version, OS, CPU, libc."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc = ""  # not glibc (musl, macOS, ...)
    glibc: tuple[int, int] | None = None
    if libc.startswith("glibc "):
        parts = libc.split()[1].split(".")
        try:
            glibc = (int(parts[0]), int(parts[1]))
        except (IndexError, ValueError):
            glibc = None
    return {
        "implementation": sys.implementation.name,
        "python": tuple(sys.version_info[:2]),
        "free_threaded": "t" in getattr(sys, "abiflags", ""),
        "os": sys.platform,
        "machine": os.uname().machine if hasattr(os, "uname") else "",
        "bits": 64 if sys.maxsize > 2**32 else 32,
        "glibc": glibc,
    }


def select(manifest: Mapping[str, Any], plat: Mapping[str, Any], group: str = "cryptography") -> WheelSet:
    """The manifest's wheel set of ``group`` for this platform, or WheelError saying why none fits."""
    import hashlib

    desc = (f"{plat['implementation']} {plat['python'][0]}.{plat['python'][1]}"
            f"{'t' if plat['free_threaded'] else ''} on {plat['os']} {plat['machine']}")
    if plat["implementation"] != "cpython" or plat["free_threaded"]:
        raise WheelError(f"this is {desc}; the wheels are for CPython with the GIL")
    if plat["os"] != "linux" or plat["bits"] != 64:
        raise WheelError(f"this is {desc}; the wheels are for 64-bit Linux")
    if plat["glibc"] is None:
        raise WheelError(f"this is {desc} without glibc (musl?); the wheels are manylinux ones")
    for raw in manifest["sets"]:
        if raw.get("group", "cryptography") != group:
            continue
        if tuple(raw["python"]) != tuple(plat["python"]) or raw["machine"] != plat["machine"]:
            continue
        need = (int(raw["glibc"][0]), int(raw["glibc"][1]))
        if tuple(plat["glibc"]) < need:
            raise WheelError(f"this is {desc} with glibc {plat['glibc'][0]}.{plat['glibc'][1]}; "
                             f"the wheels need glibc >= {need[0]}.{need[1]}")
        names = tuple(raw["wheels"])
        digest = hashlib.sha256("".join(manifest["wheels"][n] for n in names).encode()).hexdigest()
        return WheelSet(raw["key"], names, digest, group)
    raise WheelError(f"this is {desc}; no embedded wheels for it")


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$AT_GATEWAY_CACHE``, else systemd's ``$STATE_DIRECTORY``, else the user's cache directory."""
    from pathlib import Path

    env = os.environ if env is None else env
    if env.get("AT_GATEWAY_CACHE"):
        return Path(env["AT_GATEWAY_CACHE"])
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "at-gateway"


def extract_cached(zf: zipfile.ZipFile, manifest: Mapping[str, Any], wset: WheelSet, root: Path) -> Path:
    """The extracted set under ``root/wheels``; extracted there now if missing.

    Python imports submodules by path long after this returns, so the path must stay ours: the
    set is used only when every directory from ``/`` down to it (as given and as resolved) and
    everything inside it is out of other users' reach (:func:`_check_path`, :func:`_check_tree`),
    and the resolved path is what goes on ``sys.path``. Otherwise, or when the cache cannot be
    written, the set goes to a private temporary directory (removed at exit), so a read-only or
    shared home never stops the gateway from starting.
    """
    import logging
    import shutil
    import tempfile
    from pathlib import Path

    try:
        parent = _safe_directory(root / "wheels")
        final = parent / f"{wset.key}-{wset.digest[:16]}"
        if os.path.lexists(final / MARKER):
            _check_tree(final)  # found there: whoever made it, it must still be out of others' reach
            _touch(final)
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            _extract_into(zf, manifest, wset, tmp)
            os.rename(tmp, final)  # atomic: either our complete copy or another process's
        except (OSError, WheelError):  # WheelError: a corrupt wheel, or no lzma; no half copy left behind either way
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.lexists(final / MARKER):
                raise
        else:
            _fsync_dir(parent)
        _check_tree(final)  # ours, or the copy of a process that won the race
        _prune(parent, keep=final.name)
        return final
    except (OSError, WheelError) as exc:
        cause = str(exc)
        problem = f"wheel cache {root / 'wheels'} unusable ({cause})"
    try:
        directory = _extract_temporary(zf, manifest, wset)
    except (OSError, WheelError) as exc:  # one message for both, which the importer reports (no warning here)
        if str(exc) == cause:  # the wheels themselves (corrupt, no lzma), not where they went
            raise WheelError(cause) from None
        raise WheelError(f"{problem}, and no temporary directory either ({exc})") from None
    logging.getLogger("at_gateway.wheels").warning("%s; extracting into a temporary directory", problem)
    return directory


def _extract_temporary(zf: zipfile.ZipFile, manifest: Mapping[str, Any], wset: WheelSet) -> Path:
    """A fresh 0700 directory in the first safe temporary directory, removed at exit."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="at-gateway-wheels-", dir=_temporary_base()))
    atexit.register(shutil.rmtree, tmp, True)
    _extract_into(zf, manifest, wset, tmp)
    _check_tree(tmp)
    return tmp


def _temporary_base() -> str:
    """``$TMPDIR`` (or ``$TEMP``, ``$TMP``) if safe, else ``/tmp`` or ``/var/tmp``.

    Not :func:`tempfile.gettempdir`: it takes whatever it can write to, the current directory
    included, and a temporary set under a directory others can rename is as unsafe as the cache.
    """
    from pathlib import Path

    candidates = [os.environ[v] for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)] + ["/tmp", "/var/tmp"]
    reasons = []
    for candidate in dict.fromkeys(candidates):
        try:
            real = Path(os.path.realpath(candidate))
            _check_path(Path(os.path.abspath(candidate)), links=True)
            _check_path(real, links=False)
            return str(real)
        except (OSError, WheelError) as exc:
            reasons.append(str(exc))
    raise WheelError("no safe temporary directory for the embedded wheels: " + "; ".join(reasons))


def _safe_directory(path: Path) -> Path:
    """``path`` resolved, created (mode 0700) where missing, once it and every directory above it is safe."""
    from pathlib import Path

    path = Path(os.path.abspath(path))
    missing = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):  # not Path.mkdir(parents=True): its parents get 0777 minus the umask
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    real = Path(os.path.realpath(path))
    _check_path(path, links=True)  # as given: a symlink on the way is a swap point for its owner
    _check_path(real, links=False)  # as resolved: what later imports walk through
    _check_owned(real, os.lstat(real))  # the cache's own directory: no sticky exception
    return real


def _check_path(path: Path, links: bool) -> None:
    """Refuse ``path`` if anyone but us or root could replace it or a directory above it.

    Every directory up to ``/`` counts: a root-owned 0755 directory is no barrier when its own
    parent lets others rename it away. A directory others may write to is accepted only when
    sticky (like /tmp), where they cannot rename or remove entries that are not theirs: the entry
    below it is checked to be ours or root's. Group write counts as others' (it also reflects
    POSIX ACLs, whose mask shows in the group bits).
    """
    trusted = (os.geteuid(), 0)
    for p in (path, *path.parents):
        st = os.lstat(p)
        if st.st_uid not in trusted:
            raise WheelError(f"{p} is owned by another user (uid {st.st_uid})")
        if stat.S_ISLNK(st.st_mode):
            if links:
                continue  # its target is checked as part of the resolved path
            raise WheelError(f"{p} became a symlink while being checked")
        if not stat.S_ISDIR(st.st_mode):
            raise WheelError(f"{p} is not a directory")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise WheelError(f"{p} is writable by others (group or world) and not sticky")


def _check_owned(path: Path | str, st: os.stat_result) -> None:
    if st.st_uid not in (os.geteuid(), 0) or stat.S_ISLNK(st.st_mode):
        raise WheelError(f"{path} is not owned by this user or is a symlink")
    if st.st_mode & 0o022:
        raise WheelError(f"{path} is writable by others (group or world)")


def _check_tree(top: Path) -> None:
    """Refuse an extracted set unless everything in it is ours (or root's) and nobody else may write it.

    A package directory others can write lets them plant a submodule, a writable file lets them
    change one: either works long after the set was put on sys.path. No symlinks either (we never
    extract any). About 200 entries: a millisecond, once per process.
    """
    st = os.lstat(top)
    _check_owned(top, st)
    if not stat.S_ISDIR(st.st_mode):
        raise WheelError(f"{top} is not a directory")

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            _check_owned(p, os.lstat(p))


def _extract_into(zf: zipfile.ZipFile, manifest: Mapping[str, Any], wset: WheelSet, target: Path) -> None:
    """Write the set's files into ``target`` (a fresh private directory): dirs 0755, files 0644, whatever the umask."""
    import hashlib
    import io
    import json
    import zipfile

    streams: dict[str, bytes] = {}  # each stream decompressed once, however many of the set's wheels it holds
    for name in wset.wheels:
        data = _wheel_bytes(zf, manifest, name, streams)
        got = hashlib.sha256(data).hexdigest()
        if got != manifest["wheels"][name]:
            raise WheelError(f"embedded wheel {name} is corrupt (sha256 {got[:12]}..., expected "
                             f"{manifest['wheels'][name][:12]}...)")
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            for info in wheel.infolist():
                if info.is_dir():
                    continue
                rel = _safe_member(info.filename)
                directory = target
                for part in rel.parts[:-1]:
                    directory = directory / part
                    if not directory.is_dir():
                        os.mkdir(directory, 0o755)
                        os.chmod(directory, 0o755)  # the umask may have been 0
                with wheel.open(info) as src:
                    _write_file(directory / rel.parts[-1], src)
    _write_file(target / MARKER, io.BytesIO(
        (json.dumps({"key": wset.key, "digest": wset.digest, "wheels": wset.wheels}) + "\n").encode()))
    _fsync_dir(target)


def _wheel_bytes(zf: zipfile.ZipFile, manifest: Mapping[str, Any], name: str, streams: dict[str, bytes]) -> bytes:
    """An embedded wheel's bytes: a plain member, or a slice of the xz stream it was packed into.

    The caller checks them against the manifest's sha256 either way. ``streams`` keeps the streams
    decompressed so far. A Python built without the lzma module (Debian's python3 and python.org's
    builds have it; a Python compiled without liblzma's headers does not) cannot unpack a stream:
    the wheels are then unusable, and the message says why.
    """
    where = manifest.get("packed", {}).get(name)
    if where is None:
        return zf.read(f"{EMBED_DIR}/{name}")
    stream = streams.get(where["stream"])
    if stream is None:
        try:
            import lzma
        except ImportError:
            raise WheelError("this Python has no lzma module (built without liblzma?), "
                             "which unpacking the embedded wheels needs") from None
        try:
            stream = streams[where["stream"]] = lzma.decompress(zf.read(where["stream"]))
        except lzma.LZMAError as exc:
            raise WheelError(f"embedded stream {where['stream']} is corrupt ({exc})") from None
    offset, size = int(where["offset"]), int(where["size"])
    return stream[offset:offset + size]


def _write_file(dest: Path, src: Any) -> None:
    """A new file (never through an existing name or symlink), mode 0644, synced."""
    import shutil

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as out:
        os.fchmod(fd, 0o644)  # the umask may have been 0
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(fd)


def _safe_member(name: str) -> PurePosixPath:
    from pathlib import PurePosixPath

    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or not rel.parts:
        raise WheelError(f"unsafe path in an embedded wheel: {name!r}")
    return rel


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(parent: Path, keep: str) -> None:
    """Remove crashed extractions and sets of other builds that were not used for a week."""
    import shutil
    import time

    now = time.time()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if entry.name.startswith(".tmp-"):
            stale = age > STALE_TMP_SECONDS
        else:
            stale = age > STALE_SET_SECONDS and os.path.isfile(os.path.join(entry.path, MARKER))
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
