"""Compiling the kernels' C sources into one shared library, cached per source, flags and CPU."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from slimserve.config import cache_dir_from_env

SOURCES = sorted(Path(__file__).parent.glob("*.c"))  # built together into one library
HEADERS = sorted(Path(__file__).parent.glob("*.h"))


def _cpuinfo_line(*keys: str) -> str | None:
    """The first line of /proc/cpuinfo starting with one of `keys` (None off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line
    except OSError:
        pass
    return None


def _vendor() -> str:
    line = _cpuinfo_line("vendor_id")
    return line.split(":", 1)[1].strip() if line else ""


def tuning_flags(vendor: str) -> list[str]:
    """Cut-overs between the 256-bit paths and the 512-bit tiles, and how far ahead the tiles
    fetch the weights they stream, measured per CPU maker (`slimserve bench cutover` and engine
    A/Bs; both paths give the same bits, so only speed moves; docs/benchmarks.md). On AMD's Zen 4
    the int4 tiles win from 3 rows (1.11x at 3, 1.19x at 4), where on Intel's the 256-bit path
    led up to 7. Fetching a tile's codes 8 KB ahead into L2 (the int4 tiles) and the head's 16 KB
    ahead, instead of 2 KB and 1 KB into L1, keeps more of the stream in flight while the tile
    computes: then the head's tiles win from 6 rows (1.19x at 8; with the short fetch they lost
    up to 12), and batch-8 decode is 1.09x, batch 4 1.16x (in-process pairs, Zen 4)."""
    if vendor != "AuthenticAMD":
        return []
    fetch = ["-DZFETCH=8192", "-DZHINT=_MM_HINT_T1", "-DZFETCH8=16384", "-DZHINT8=_MM_HINT_T1"]
    return ["-DZMIN=3", "-DZMIN8=6", *fetch]


FLAGS = [
    "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99", *tuning_flags(_vendor())
]  # fmt: skip


def _cpu_tag() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    return _cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()


def build(flags: list[str] = FLAGS) -> Path:
    """The kernels' shared library built with `flags` (from the cache when it is there)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc or gcc)")
    key = hashlib.sha256(" ".join(flags).encode() + _cpu_tag().encode())
    for src in SOURCES + HEADERS:
        key.update(src.name.encode() + src.read_bytes())
    out_dir = cache_dir_from_env() / "kernels"
    target = out_dir / f"slimserve-kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: processes that build at once never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed: {e.stderr.strip()[-500:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
