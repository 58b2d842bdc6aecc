"""Files that hold work: written whole or not at all, guarded against a second writer, and
read back with errors that name the file (docs/design.md section 8).

Every write goes through three primitives, so that a fault-injection test can kill the
process at each of them (``tests/test_crash_safety.py``):

- :func:`write_file`: ``write(tmp)`` into a unique temporary name beside the target,
  flushed to disk (fsync);
- :func:`publish`: the atomic rename of a finished temporary file or directory onto its
  final name, then an fsync of the folder so the rename itself survives a power cut;
- :func:`discard`: a directory renamed out of the way, then deleted.

A reader therefore sees a file (or a checkpoint directory) either as it was before or as
the writer finished it, never half of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor


class RunLockedError(RuntimeError):
    """Another live process holds the lock of a run directory."""


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A name beside ``path`` no other writer uses (process id and a random token), hidden
    (leading dot) and recognizable (``.<name>.<kind>-<pid>-<token>``)."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` then fsync: the file's bytes are on disk before anyone renames it."""
    write(path)
    _fsync_file(path)


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` (a file, or a directory when ``final`` does not exist) onto ``final``
    atomically and make the rename durable."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def discard(folder: Path) -> None:
    """Remove a directory: first renamed to a hidden trash name (one atomic step, so a kill
    mid-deletion leaves nothing that looks like a checkpoint), then deleted."""
    trash = temporary_name(folder, "trash")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path, what: str = "path") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block finishes, the file written
    there replaces ``path`` in one step. On an error the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what}: cannot create the folder {folder} ({e.strerror or e})") from None
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path, text: str, what: str = "path") -> Path:
    """``path`` replaced by ``text`` atomically."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_safetensors(tensors: Mapping[str, Tensor], path, metadata: Mapping[str, str] | None = None,
                     what: str = "path") -> Path:
    """A safetensors file written atomically (unique temporary name, then rename)."""
    from safetensors.torch import save_file

    with atomic_path(path, what) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def open_safetensors(path, what: str = "path", device: str = "cpu"):
    """``safe_open`` whose errors name the file (missing, truncated or not safetensors)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not a readable safetensors file (truncated or of another "
                         f"format: {e})") from None


def read_safetensors(path, what: str = "path", device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a damaged file raises a ValueError
    naming it."""
    from safetensors import SafetensorError

    with open_safetensors(path, what, device) as f:
        meta = dict(f.metadata() or {})
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{what}: {path} is damaged ({e})") from None
    return tensors, meta


def json_metadata(meta: Mapping[str, str], key: str, default, path, what: str = "path"):
    """``json.loads(meta[key])`` (``default`` when absent); a malformed entry raises a
    ValueError naming the file and the key."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: the metadata entry {key!r} of {path} is not valid JSON ({e.msg})") from None


def check_writable(folder, what: str = "out") -> Path:
    """Create ``folder`` and prove a file can be written in it and renamed, before any work
    is done that would be lost at the first save."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "write-probe")
        probe.write_bytes(b"")
        os.replace(probe, probe.with_name(probe.name + "-renamed"))
        probe.with_name(probe.name + "-renamed").unlink()
    except OSError as e:
        raise PermissionError(f"{what}: cannot write in {folder} ({e.strerror or e}); choose a writable "
                              f"directory") from None
    return folder


class RunLock:
    """An exclusive lock on a run directory (``<folder>/.lock``, ``flock``): a second process
    that tries to take it gets a :class:`RunLockedError` naming the holder. The kernel drops
    the lock when its holder exits, killed or not, so a crash never leaves a stale lock."""

    def __init__(self, folder, what: str = "out"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        check_writable(self.folder, self.what)
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.what}: {self.folder} is in use by another run ({holder}); wait for it "
                                 f"to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.write(fd, info.encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state_dict's tensors: the
    identity of a set of weights (two files with the same weights agree)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, Tensor):
            continue
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


__all__ = ["RunLock", "RunLockedError", "atomic_path", "check_writable", "discard", "fingerprint", "json_metadata",
           "open_safetensors", "publish", "read_safetensors", "save_safetensors", "sha256_file", "temporary_name",
           "write_file", "write_text"]


def load_checkpoint(path) -> dict[str, Tensor]:
    """A state_dict from a safetensors file or a torch checkpoint (``weights_only=True``: never
    unpickles code). A checkpoint holding ``{"state_dict": ...}`` is unwrapped."""
    path = str(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path, "path")[0]
    if not Path(path).is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"path: {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"path: {path} is not a readable torch checkpoint of tensors ({first})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"path: {path} holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)
