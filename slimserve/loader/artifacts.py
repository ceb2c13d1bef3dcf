"""What the engine derives from a model file, kept on disk so later loads map it, not rebuild it.

Two artifacts, both under `$SLIMSERVE_CACHE/artifacts` (beside the built kernels):
- the packed model (`.pt`): the module tree after quantization's packing, saved with
  `torch.save` and loaded with `torch.load(mmap=True)`, so a warm load maps the packed tiles and
  the 8-bit head instead of decoding and repacking every block (~0.6 s for the default model);
- the tokenizer (`.json`): the `tokenizers` JSON and the special ids, built once from the
  GGUF vocabulary.

An entry's key is the model file's stamp (name, size, mtime and a digest of its ends), the
settings that change the packing, the torch version and a digest of slimserve's own sources, so
a changed file or a new engine never reads an old entry. Each entry has a sidecar with its size
and CRC-32: an entry that is truncated or corrupt is logged, deleted and rebuilt, never loaded.
Entries are written to a private name and renamed, so concurrent loads never see half a file.
`SLIMSERVE_ARTIFACT_CACHE=0` turns the cache off; `SLIMSERVE_ARTIFACTS` moves it.

The packed model is a pickle, so it is trusted as the built kernels beside it are: both are
files this user's engine wrote into this user's cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from slimserve.config import artifact_dir_from_env

logger = logging.getLogger("slimserve")

KEEP_ENTRIES = 8  # per kind; older entries (other files, other settings) are deleted


def directory() -> Path | None:
    """The cache's folder; None when the cache is off."""
    return artifact_dir_from_env()


@functools.cache
def code_digest() -> str:
    """A digest of slimserve's Python and C sources: a new engine never reads an old pickle."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(torch.__version__.encode(), digest_size=16)
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c", ".h") and "bench" not in path.parts:
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def file_stamp(paths: list[str], mtime: bool = True) -> str:
    """Each file's name, size, mtime (unless not `mtime`: the same in any copy of the files)
    and a digest of its first and last 64 KiB."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if mtime else f"{st.st_size}"
        h.update(f"{os.path.basename(path)}:{stamp}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, st.st_size - (1 << 16)))
            h.update(f.read(1 << 16))
    return h.hexdigest()


def entry_key(stamp: str, *settings) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([stamp, code_digest(), *map(str, settings)]).encode())
    return h.hexdigest()


def _crc(path: Path) -> int:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return zlib.crc32(m)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".check")


def _valid(path: Path) -> bool:
    """Whether `path` is whole: its size and CRC-32 match what was written beside it."""
    try:
        check = json.loads(_sidecar(path).read_text())
        return path.stat().st_size == check["size"] and _crc(path) == check["crc32"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _discard(path: Path) -> None:
    for p in (path, _sidecar(path)):
        try:
            p.unlink()
        except OSError:
            pass


def _write(path: Path, write: Callable[[str], None]) -> None:
    """Write an entry to a private name and rename it in place, sidecar first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        check = {"size": os.path.getsize(tmp), "crc32": _crc(Path(tmp))}
        _sidecar(path).write_text(json.dumps(check))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(path.parent, path.suffix)


def _prune(folder: Path, suffix: str) -> None:
    entries = sorted(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES:]:
        _discard(old)


def _lookup(path: Path) -> bool:
    """Whether a usable entry is at `path`; a damaged one is logged and removed."""
    if not path.exists():
        return False
    if _valid(path):
        return True
    logger.warning("artifact cache entry %s is truncated or corrupt; rebuilding it", path.name)
    _discard(path)
    return False


def cached_model(key: str, build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, bool]:
    """The packed model for `key`, mapped from the cache or built (and written). Returns the
    model and whether it came from the cache. A fresh build is saved and mapped back, so cold and
    warm loads hold the same memory: the file's pages, not a heap copy."""
    folder = directory()
    if folder is None:
        return build(), False
    path = folder / f"model-{key}.pt"
    if _lookup(path):
        try:
            return torch.load(path, mmap=True, weights_only=False), True
        except Exception as e:  # a stale pickle (a class gone) is rebuilt like a damaged one
            logger.warning("artifact cache entry %s could not be loaded (%s); rebuilding it",
                           path.name, e)  # fmt: skip
            _discard(path)
    model = build()
    try:
        _write(path, functools.partial(torch.save, model))
    except OSError as e:  # a read-only or full disk: run from the fresh build
        logger.warning("could not write the artifact cache (%s); loads will repack", e)
        return model, False
    del model
    _release_heap()
    return torch.load(path, mmap=True, weights_only=False), False


def _release_heap() -> None:
    """Hand the packing's freed temporaries back to the OS (glibc keeps freed heap otherwise,
    ~190 MiB of a cold load's resident memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


def experts_path(key: str) -> Path | None:
    """Where an MoE model's experts file for `key` goes (loader/experts.py); None: cache off.
    The file is checked by size only: a CRC would read gigabytes at every start."""
    folder = directory()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"experts-{key}.bin"


def note_experts_file(path, size: int) -> None:
    """After an experts file is written: its expected size beside it, and old ones pruned."""
    path = Path(path)
    if path.parent == directory():
        _sidecar(path).write_text(json.dumps({"size": size}))
        _prune(path.parent, ".bin")


def require_experts_file(key: str, path) -> None:
    """A packed model whose experts file is missing or cut short is rebuilt with it."""
    try:
        ok = Path(path).stat().st_size == json.loads(_sidecar(Path(path)).read_text())["size"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        _discard(Path(path))
        _discard(directory() / f"model-{key}.pt")


def cached_json(key: str, build: Callable[[], dict]) -> dict:
    """A JSON-able artifact (the tokenizer) for `key`, read from the cache or built."""
    folder = directory()
    if folder is None:
        return build()
    path = folder / f"tokenizer-{key}.json"
    if _lookup(path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            _discard(path)
    value = build()
    try:
        _write(path, lambda tmp: Path(tmp).write_text(json.dumps(value), encoding="utf-8"))
    except OSError as e:
        logger.warning("could not write the artifact cache (%s)", e)
    return value
