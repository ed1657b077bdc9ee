#!/usr/bin/env python3
"""Build ``dist/at-gateway.pyz``: the whole gateway in one file for a stock CPython >= 3.10.

The zip holds ``at_gateway/`` (plus a generated ``at_gateway/_build.py`` naming the
commit), the pure-Python dependencies unpacked (h11, anyio and its own, PyYAML's
pure part), and the manylinux wheels of the compiled ones (cryptography, cffi,
uvloop) that ``at_gateway.wheels`` extracts on first use.

The compiled wheels are re-stored uncompressed (:func:`repack_wheel`) and those of one
project and machine packed into one xz stream (``_embedded/<project>-<version>-<machine>.xz``):
xz over the raw files beats the wheels' per-file deflate by far, and the near-identical
builds for five Pythons (cffi's, uvloop's) compress against each other. cryptography's
and cffi's files are kept byte for byte (their RECORD stays true): 3.3 + 0.3 MB per
machine where the PyPI wheels take 4.75 + 1.1. uvloop's are also slimmed, being
built with debug info (ten wheels of 4 MB): its ``.so`` keeps only the part the
dynamic loader maps (:func:`elf_loaded_part`: what ``sstrip`` keeps; debug info,
symbol table and section headers go) and its Cython sources and test helpers are
left out, about 1.7 MB per machine instead of 21. The manifest records each packed
wheel's sha256 and where it lies in its stream; the runtime checks it before use.

Every wheel used is pinned by file name and sha256 in ``deploy/pyz-wheels.txt``
(PyPI files never change), downloaded once with ``pip download`` into a
git-ignored cache (``build/wheel-cache``) and checked against that list (the packed
wheels are made from those checked files), so a build needs the network only the
first time. The archive is reproducible: entries sorted, timestamps fixed
(``$SOURCE_DATE_EPOCH``, else the commit's time), fixed permissions and compression,
so two builds of the same tree are byte-identical.

The xz streams take about 8 s to compress (two at a time), so they are kept beside the
downloads (``build/wheel-cache/packed/``), named by the sha256 of what they hold and
checked against it (decompressed and compared) before every reuse.

To upgrade a dependency, change its line in ``deploy/pyz-wheels.txt`` (file name
and sha256, as listed on PyPI or printed by a failed build).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK = ROOT / "deploy" / "pyz-wheels.txt"
DEFAULT_CACHE = ROOT / "build" / "wheel-cache"
DEFAULT_OUTPUT = ROOT / "dist" / "at-gateway.pyz"
SHEBANG = b"#!/usr/bin/env python3\n"
#: Compiled projects, by the group extracted together on the first import of one of them
#: (at_gateway.wheels.GROUPS names the modules that trigger each group).
GROUPS = (("cryptography", ("cryptography", "cffi")), ("uvloop", ("uvloop",)))
EMBEDDED = tuple(project for _, projects in GROUPS for project in projects)
#: Projects whose wheels are slimmed before packing (see the module docstring); the others keep every file.
SLIMMED = frozenset({"uvloop"})
#: Left out of a slimmed wheel: Cython sources and headers, type stubs, the project's own test helpers.
SLIM_SKIP = (".pyx", ".pxd", ".pxi", ".pyi", "/py.typed", "/_testbase.py", ".dist-info/RECORD")
#: Bumped when the slimming or packing changes, so that cached xz streams of the old kind are not reused.
PACK_FORMAT = 1
#: Interpreters and machines the embedded wheels must cover (a set per pair).
PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13), (3, 14))
MACHINES = ("x86_64", "aarch64")
#: "Under 15 MB", decimal: a larger .pyz is a build error (it is downloaded and copied to every server).
SIZE_BUDGET = 15_000_000
#: Files of pure-Python wheels left out of the zip: compiled leftovers and install bookkeeping.
SKIP_SUFFIXES = (".so", ".pyd", ".dylib", ".dll", ".pyi")
EARLIEST_ZIP_TIME = 315532800  # 1980-01-01, the earliest a zip entry can say

MAIN = '''\
"""Entry point of at-gateway.pyz (written by build_zipapp.py)."""
import sys

if sys.version_info < (3, 10):  # say so plainly, before any newer syntax fails to parse
    sys.exit("at-gateway needs Python 3.10 or newer; %s is Python %s" % (sys.executable, sys.version.split()[0]))

from at_gateway.wheels import install  # noqa: E402

install()  # compiled dependencies: extracted on their first import, not before

from at_gateway.cli import main  # noqa: E402

sys.exit(main())
'''

_WHEEL_RE = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


class BuildError(Exception):
    pass


class Wheel:
    """A wheel file name taken apart (PEP 427)."""

    def __init__(self, filename: str, sha256: str) -> None:
        m = _WHEEL_RE.match(filename)
        if not m:
            raise BuildError(f"{LOCK.name}: not a wheel file name: {filename}")
        self.filename = filename
        self.sha256 = sha256
        self.project = re.sub(r"[-_.]+", "_", m["name"]).lower()
        self.version = m["version"]
        self.pythons = m["py"].split(".")
        self.abis = m["abi"].split(".")
        self.platforms = m["plat"].split(".")

    @property
    def pure(self) -> bool:
        return self.platforms == ["any"]

    @property
    def machine(self) -> str | None:
        for plat in self.platforms:
            for machine in MACHINES:
                if plat.endswith("_" + machine):
                    return machine
        return None

    @property
    def min_glibc(self) -> tuple[int, int]:
        found = []
        for plat in self.platforms:
            m = re.match(r"manylinux_(\d+)_(\d+)_", plat)
            if m:
                found.append((int(m[1]), int(m[2])))
            elif plat.split("_")[0] in _LEGACY_MANYLINUX:
                found.append(_LEGACY_MANYLINUX[plat.split("_")[0]])
        if not found:
            raise BuildError(f"{self.filename}: not a manylinux wheel")
        return min(found)

    def fits(self, python: tuple[int, int]) -> int:
        """How well this wheel fits CPython ``python``: 0 not at all, higher is better."""
        best = 0
        for py in self.pythons:
            m = re.fullmatch(r"cp3(\d+)", py)
            if not m:
                continue
            minor = int(m[1])
            if "abi3" in self.abis and minor <= python[1]:
                best = max(best, 1 + minor)  # a stable-ABI wheel for an older or equal Python
            elif f"cp3{python[1]}" in self.abis and minor == python[1]:
                best = max(best, 100)  # made for exactly this Python
        return best

    def pip_args(self) -> list[str]:
        """``pip download`` arguments that select exactly this file."""
        args = ["--no-deps", "--only-binary=:all:", f"{self.project}=={self.version}"]
        if self.pure:
            return args
        # The oldest interpreter we target that this wheel fits ("3.9" would mean 3.9.0, which some refuse).
        python = min((p for p in PYTHONS if self.fits(p)), default=None)
        if python is None:
            raise BuildError(f"{self.filename} fits none of the targeted Pythons")
        args += ["--implementation", "cp", "--python-version", f"{python[0]}.{python[1]}"]
        for abi in self.abis:
            args += ["--abi", abi]
        for plat in self.platforms:
            args += ["--platform", plat]
        return args


def read_lock(path: Path = LOCK) -> list[Wheel]:
    wheels = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise BuildError(f"{path}:{n}: expected '<sha256>  <wheel file name>'")
        wheels.append(Wheel(parts[1], parts[0]))
    return wheels


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(wheels: list[Wheel], cache: Path, offline: bool = False) -> None:
    """Make sure every wheel is in ``cache`` with its pinned sha256, downloading the missing ones."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not (cache / w.filename).is_file() or sha256_of(cache / w.filename) != w.sha256]
    if not missing:
        return
    if offline:
        raise BuildError("not in the wheel cache (and --offline): " + ", ".join(w.filename for w in missing))
    print(f"downloading {len(missing)} wheel(s) into {cache}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for err in pool.map(lambda w: _download(w, cache), missing):
            if err:
                raise BuildError(err)


def _download(wheel: Wheel, cache: Path) -> str | None:
    with tempfile.TemporaryDirectory(prefix="dl-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", tmp,
               *wheel.pip_args()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.is_file():
            found = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            return (f"pip download of {wheel.filename} failed (got {found}): "
                    f"{(proc.stderr or proc.stdout).strip()[-800:] or 'no output'}\n"
                    "The build needs pip and PyPI the first time; run it with the project's venv (make pyz).")
        digest = sha256_of(got)
        if digest != wheel.sha256:
            return (f"{wheel.filename}: sha256 {digest} does not match {wheel.sha256} in {LOCK.name}; "
                    "if you meant to change the file, put the new hash in the lock")
        os.replace(got, cache / wheel.filename)
    return None


def wheel_sets(embedded: list[Wheel]) -> list[dict[str, object]]:
    """For each group and (Python, machine) pair: the best-fitting wheel of every project of the group."""
    sets: list[dict[str, object]] = []
    for group, projects in GROUPS:
        for python in PYTHONS:
            for machine in MACHINES:
                chosen = []
                for project in projects:
                    candidates = [(w.fits(python), w.filename, w) for w in embedded
                                  if w.project == project and w.machine == machine and w.fits(python)]
                    if not candidates:
                        raise BuildError(f"{LOCK.name} has no {project} wheel for CPython "
                                         f"{python[0]}.{python[1]} on {machine}")
                    chosen.append(max(candidates)[2])
                glibc = max(w.min_glibc for w in chosen)
                sets.append({"key": f"{group}-cp{python[0]}{python[1]}-{machine}", "group": group,
                             "python": list(python), "machine": machine, "glibc": list(glibc),
                             "wheels": [w.filename for w in chosen]})
    return sets


def elf_loaded_part(data: bytes, name: str) -> bytes:
    """A 64-bit little-endian ELF shared object cut to what its program headers cover.

    The dynamic loader reads program headers only: everything it maps (code, data, the dynamic
    symbols, unwind tables, notes) lies inside a segment, and the rest (DWARF debug info, the full
    symbol table, section headers) is for debuggers. The section header table is dropped with it
    and the header's pointers to it zeroed, as ``sstrip`` does. Pure Python, so the result is the
    same on every build machine and needs no binutils for a foreign CPU.
    """
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{name}: not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    ehsize, phentsize, phnum = struct.unpack_from("<HHH", data, 0x34)
    if phnum == 0 or phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise BuildError(f"{name}: no usable program header table")
    end = max(ehsize, phoff + phnum * phentsize)
    for i in range(phnum):
        _, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        end = max(end, offset + filesz)
    if end > len(data):
        raise BuildError(f"{name}: a segment ends past the end of the file")
    out = bytearray(data[:end])
    struct.pack_into("<Q", out, 0x28, 0)  # e_shoff: no section header table
    struct.pack_into("<HHH", out, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    return bytes(out)


def repack_wheel(path: Path, slim: bool) -> bytes:
    """The wheel at ``path`` as a stored (uncompressed) zip, for xz to compress as a whole.

    Entries keep their names, dates (from the pinned wheel) and contents, in sorted order, so the
    result depends on the input file only. ``slim`` keeps only what importing it needs (see the
    module docstring); licences and metadata stay either way.
    """
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            if info.is_dir() or (slim and info.filename.endswith(SLIM_SKIP)):
                continue
            data = src.read(info)
            if slim and info.filename.endswith(".so"):
                data = elf_loaded_part(data, f"{path.name}:{info.filename}")
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.create_system = 3
            entry.external_attr = 0o100644 << 16
            dst.writestr(entry, data)
    return out.getvalue()


def xz_filters(machine: str) -> list[dict[str, int]]:
    """LZMA2 at preset 6 (an 8 MiB window: it spans the neighbouring builds), after x86's BCJ filter on x86_64.

    BCJ turns call targets into absolute addresses that repeat, about 7 % smaller; every liblzma
    decodes it. No ARM64 filter: older liblzma (and Python's lzma before 3.12) lack it. Preset 9
    (and -e) saves under 0.3 % here and makes every first start allocate a 64 MiB window.
    """
    lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 6}
    return [{"id": lzma.FILTER_X86}, lzma2] if machine == "x86_64" else [lzma2]


def pack(wheels: list[Wheel], cache: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, dict[str, object]]]:
    """Repack the embedded wheels (:func:`repack_wheel`) and those of one project and machine into one xz stream.

    Returns the streams by archive name, the repacked wheels' sha256s and, per wheel, where it lies
    in its stream once decompressed. The streams are cached in ``cache/packed`` by the sha256 of
    their content, and a cached one is used only if it decompresses to exactly that content.
    """
    groups: dict[tuple[str, str, str], list[Wheel]] = {}
    for w in sorted(wheels, key=lambda w: w.filename):
        if w.machine is None:
            raise BuildError(f"{w.filename}: embedded projects need a wheel per machine")
        groups.setdefault((w.project, w.version, w.machine), []).append(w)
    digests: dict[str, str] = {}
    where: dict[str, dict[str, object]] = {}
    jobs: list[tuple[str, bytes, str]] = []  # (stream name, content, machine)
    for (project, version, machine), members in groups.items():
        name = f"{project}-{version}-{machine}.xz"
        blob = io.BytesIO()
        for w in members:
            data = repack_wheel(cache / w.filename, slim=project in SLIMMED)
            digests[w.filename] = hashlib.sha256(data).hexdigest()
            where[w.filename] = {"stream": f"_embedded/{name}", "offset": blob.tell(), "size": len(data)}
            blob.write(data)
        jobs.append((name, blob.getvalue(), machine))
    jobs.sort(key=lambda job: -len(job[1]))  # the biggest first, so that the last to finish is a small one
    with ThreadPoolExecutor(max_workers=2) as pool:  # lzma lets go of the GIL: two streams at once
        streams = list(pool.map(lambda job: _xz_cached(job[0], job[1], job[2], cache / "packed"), jobs))
    return {f"_embedded/{job[0]}": data for job, data in zip(jobs, streams, strict=True)}, digests, where


def _xz_cached(name: str, content: bytes, machine: str, directory: Path) -> bytes:
    digest = hashlib.sha256(b"%d:%s:" % (PACK_FORMAT, machine.encode()) + content).hexdigest()
    path = directory / f"{name.removesuffix('.xz')}-{digest[:16]}.xz"
    try:
        cached = path.read_bytes()
        if lzma.decompress(cached) == content:
            return cached
    except (OSError, lzma.LZMAError):
        pass
    data = lzma.compress(content, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=xz_filters(machine))
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_id() -> str:
    """The commit the build inputs come from; ``-dirty`` when they differ from it."""
    if os.environ.get("AT_GATEWAY_COMMIT"):
        return os.environ["AT_GATEWAY_COMMIT"]
    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    status = git("status", "--porcelain", "--untracked-files=all", "--", "at_gateway", "build_zipapp.py",
                 str(LOCK.relative_to(ROOT)))
    return commit + ("-dirty" if status else "")


def source_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return max(int(os.environ["SOURCE_DATE_EPOCH"]), EARLIEST_ZIP_TIME)
    committed = git("log", "-1", "--format=%ct")
    return max(int(committed), EARLIEST_ZIP_TIME) if committed and committed.isdigit() else EARLIEST_ZIP_TIME


def package_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    pkg = ROOT / "at_gateway"
    for path in sorted(pkg.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        if path.name.startswith(".") or path.name.endswith("~"):
            continue  # editor and OS droppings
        if rel != "at_gateway/_build.py":  # a developer's local one; the build writes its own
            files[rel] = path.read_bytes()
    return files


def pure_files(wheel_path: Path) -> dict[str, bytes]:
    files = {}
    with zipfile.ZipFile(wheel_path) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or name.endswith(SKIP_SUFFIXES) or name.endswith(".dist-info/RECORD"):
                continue
            if name.split("/", 1)[0].endswith(".data"):
                continue  # scripts and headers: not importable, not needed
            files[name] = zf.read(info)
    return files


def build(output: Path, cache: Path, offline: bool = False) -> Path:
    wheels = read_lock()
    fetch(wheels, cache, offline)
    files = package_files()
    files["__main__.py"] = MAIN.encode()
    files["at_gateway/_build.py"] = (
        '"""Written by build_zipapp.py: what this .pyz was built from."""\n\n'
        f"COMMIT = {commit_id()!r}\n").encode()
    stored: dict[str, bytes] = {}
    embedded = [w for w in wheels if w.project in EMBEDDED]
    streams, digests, packed = pack(embedded, cache)
    stored.update(streams)
    for w in wheels:
        if w.project in EMBEDDED:
            continue  # packed above
        for name, data in pure_files(cache / w.filename).items():
            if name in files:
                raise BuildError(f"{w.filename}: {name} is also provided by another input")
            files[name] = data
    manifest = {"format": 2, "wheels": digests, "packed": packed, "sets": wheel_sets(embedded)}
    files["_embedded/manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()

    date_time = time.gmtime(source_epoch())[:6]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as zf:
                for name in sorted({*files, *stored}):
                    info = zipfile.ZipInfo(name, date_time=date_time)
                    info.create_system = 3  # unix, whatever the build machine
                    info.external_attr = 0o100644 << 16
                    if name in stored:
                        info.compress_type = zipfile.ZIP_STORED  # xz streams: deflate would only add
                        zf.writestr(info, stored[name])
                    else:
                        info.compress_type = zipfile.ZIP_DEFLATED
                        zf.writestr(info, files[name], compresslevel=9)
        os.chmod(tmp, 0o755)
        check_budget(tmp)  # before the rename: an oversized build leaves no .pyz behind
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output


def check_budget(path: Path, budget: int = SIZE_BUDGET) -> None:
    """Refuse a .pyz over the budget: a dependency that grew must be looked at, not shipped unnoticed.

    The message names the biggest entries, since the refused file is not kept.
    """
    size = os.path.getsize(path)
    if size <= budget:
        return
    with zipfile.ZipFile(path) as zf:
        biggest = sorted(zf.infolist(), key=lambda i: -i.compress_size)[:3]
    raise BuildError(f"the .pyz would be {size:,} bytes, over the {budget:,}-byte budget (SIZE_BUDGET); biggest: "
                     + ", ".join(f"{i.filename} ({i.compress_size:,})" for i in biggest))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the one-file at-gateway.pyz.")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    p.add_argument("--wheel-cache", type=Path, default=Path(os.environ.get("AT_GATEWAY_WHEEL_CACHE") or DEFAULT_CACHE),
                   help="where downloaded wheels are kept (default: $AT_GATEWAY_WHEEL_CACHE or build/wheel-cache)")
    p.add_argument("--offline", action="store_true", help="fail instead of downloading missing wheels")
    args = p.parse_args(argv)
    try:
        out = build(args.output, args.wheel_cache, args.offline)
    except (BuildError, OSError) as exc:
        print(f"build_zipapp: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
