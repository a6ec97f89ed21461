"""Building and loading the native CPU kernels: the toolchain every kernel module shares.

The C sources (csrc/) are compiled with `cc` (gcc or clang) into the pdserve cache the first
time a process needs them (well under a second) and reused after; concurrent processes race
safely (each writes a private temp file, then renames it into place). The libraries use OpenMP
and bind to the libgomp torch has already loaded, so their threads are torch's own. A kernel
module asks here for its library and types its functions with `bind`; where there is no
compiler or the CPU lacks a flag, the module's `build_*` returns None and torch's op stays.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ("-O3", "-fopenmp", "-mavx512f", "-mavx512bf16", "-mfma", "-shared", "-fPIC")
FLOAT_SOURCES = ("lm_head", "decode_attention", "decode_layer", "norm_act")


def cache_dir() -> Path:
    base = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return base / "kernels"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (`avx512f`, ...), from /proc/cpuinfo; empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_library(
    name: str | tuple[str, ...] = "lm_head",
    flags: tuple[str, ...] = CFLAGS,
    out_dir: Path | None = None,
) -> Path:
    """The shared library built from csrc/`name`.c (or several sources, named after the first;
    all may include the headers there), compiled into `out_dir` unless it is already there."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (install gcc, or set CC) to build the CPU kernels")
    names = (name,) if isinstance(name, str) else name
    sources = [CSRC / f"{n}.c" for n in names]
    text = b"".join(p.read_bytes() for p in [*sources, *sorted(CSRC.glob("*.h"))])
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"{names[0]}-{digest}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, *map(str, sources)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {names[0]}: {proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def float_kernels() -> ctypes.CDLL:
    """The float kernels (lm_head.c, decode_attention.c, decode_layer.c, norm_act.c) as one
    library, built on first use; every caller gets the same loaded object."""
    return ctypes.CDLL(str(compile_library(FLOAT_SOURCES, CFLAGS)))


def bind(lib: ctypes.CDLL, names: tuple[str, ...], argtypes: list) -> list:
    """`lib`'s functions `names`, typed with `argtypes` and an int return code."""
    fns = [getattr(lib, name) for name in names]
    for fn in fns:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return fns


# Errors a kernel module's build_* turns into "off, torch's op stays" (reason logged).
BUILD_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError)


def avx512_float_kernels(what: str) -> ctypes.CDLL | None:
    """`float_kernels()` for a kernel that needs only AVX-512F, or None with the reason logged
    as "`what` off: ..." (the CPU lacks it, or the build failed)."""
    if "avx512f" not in cpu_flags():
        log.info("%s off: this CPU lacks avx512f", what)
        return None
    try:
        return float_kernels()
    except BUILD_ERRORS as exc:
        log.info("%s off: %s", what, exc)
        return None


def keep_freed_memory_mapped() -> bool:
    """Make glibc's malloc reuse freed blocks of any size instead of unmapping them.

    By default glibc serves blocks above ~32 MB with mmap and unmaps them on free, so a step
    that allocates logits `[64, 152k]` (39 MB) page-faults it in again every time: 9 ms per
    step for allocate-and-fill here instead of 2.5 ms, which halved the engine's throughput at
    batch 64. Returns False where the C library is not glibc. Process-wide; the engine calls it
    once at start on CPU, beside building the kernels.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    limit = 2**31 - 1
    # M_MMAP_THRESHOLD (-3): serve blocks below `limit` from the heap; M_TRIM_THRESHOLD (-1):
    # do not hand the heap's top back to the OS after every large free.
    return bool(mallopt(-3, limit)) and bool(mallopt(-1, limit))
