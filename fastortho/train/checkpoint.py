"""Checkpoints of a fine-tuning run, each visible whole or not at all (docs/design.md
section 8).

A run's checkpoint folder holds one directory per saved step::

    ckpt-<task>/.lock                 held by the run (fastortho._files.RunLock)
    ckpt-<task>/step-00000030/        model.safetensors  trained state (safetensors)
                                      train_state.pt     optimizer, schedule, tau-Jp streams
                                      config.json        the run's FinetuneConfig
                                      manifest.json      written last: step, each file's size
                                                         and sha256, the base weights' identity

A step directory is built under a hidden temporary name and renamed into place once every
file in it is on disk, so a kill at any point leaves either the previous checkpoints or the
new one complete. On load the newest directory whose manifest matches its files is used;
a damaged one is reported and the one before it is tried. The two newest are kept.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import _files
from .._version import __version__
from .config import FinetuneConfig

FORMAT = "fastortho.checkpoint"
FILES = ("model.safetensors", "train_state.pt", "config.json")
KEEP = 2  # the newest and the one before it (used if the newest turns out damaged)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class DamagedCheckpoint(ValueError):
    """A step directory whose files do not match its manifest."""


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every published checkpoint, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in folder.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found, reverse=True)


def verify(directory: Path) -> dict:
    """The manifest of a complete checkpoint; :class:`DamagedCheckpoint` saying what is wrong
    otherwise."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint("manifest.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"manifest.json is not valid JSON ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise DamagedCheckpoint("manifest.json is not a fastortho checkpoint manifest")
    step = manifest.get("step")
    if not isinstance(step, int) or f"step-{step:08d}" != directory.name:
        raise DamagedCheckpoint(f"manifest.json names step {step!r}")
    for name in FILES:
        entry = manifest["files"].get(name)
        path = directory / name
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
            raise DamagedCheckpoint(f"manifest.json has no entry for {name}")
        if not path.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise DamagedCheckpoint(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if _files.sha256_file(path) != entry["sha256"]:
            raise DamagedCheckpoint(f"{name} does not match its checksum")
    return manifest


def is_complete(directory: Path) -> bool:
    try:
        verify(directory)
    except DamagedCheckpoint:
        return False
    return True


def latest(folder: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in ``folder`` and its manifest (damaged ones are
    reported with a warning and skipped), or None."""
    dirs = step_dirs(folder)
    if not dirs and (folder / "train_state.pt").exists():
        raise ValueError(f"resume: {folder} holds a checkpoint of an earlier fastortho without a manifest, which "
                         f"cannot be checked for completeness; start over with --no-resume (resume=False)")
    for _, directory in dirs:
        try:
            return directory, verify(directory)
        except DamagedCheckpoint as e:
            warnings.warn(f"resume: the checkpoint {directory} is damaged ({e}); trying the one before it",
                          stacklevel=3)
    if dirs:
        warnings.warn(f"resume: no complete checkpoint in {folder}; starting from step 0", stacklevel=3)
    return None


def tidy(folder: Path) -> None:
    """Drop all but the KEEP newest checkpoints and what killed writers left (hidden
    temporary and trash directories). Only called by the lock's holder."""
    for _, directory in step_dirs(folder)[KEEP:]:
        _files.discard(directory)
    for leftover in folder.glob(".step-*"):
        if leftover.is_dir():
            _files.discard(leftover)


def save_checkpoint(folder: Path, net: nn.Module, opt, sched, step: int, cfg: FinetuneConfig, *,
                    base: dict | None = None, extra: dict | None = None) -> Path:
    """Publish ``step-<step>`` in ``folder``: the trained state, optimizer and schedule,
    ``extra`` (more resumable state, e.g. the tau-Jp streams), the configuration and a
    manifest recording ``base`` (the identity of the weights fine-tuning started from)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    if final.is_dir() and is_complete(final):  # saved by an earlier run (a damaged one is replaced below)
        tidy(folder)
        return final
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                   "extra": extra or {}}
    tmp = _files.temporary_name(final)
    tmp.mkdir()
    _files.write_file(tmp / "model.safetensors",
                      lambda p: save_file(state, str(p), metadata={"step": str(step)}))
    _files.write_file(tmp / "train_state.pt", lambda p: torch.save(train_state, p))
    _files.write_file(tmp / "config.json", lambda p: p.write_text(json.dumps(asdict(cfg), indent=1)))
    manifest = {"format": FORMAT, "fastortho": __version__, "step": step, "base": base or {},
                "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _files.sha256_file(tmp / n)}
                          for n in FILES}}
    _files.write_file(tmp / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))
    if final.exists():
        _files.discard(final)  # a damaged directory of the same step
    _files.publish(tmp, final)
    tidy(folder)
    return final


def clear(folder: Path) -> None:
    """Remove every checkpoint in ``folder`` (a run started over must not later resume from
    an older run's steps)."""
    for _, directory in step_dirs(folder):
        _files.discard(directory)
    for name in ("model.safetensors", "train_state.pt", "config.json"):  # an earlier fastortho's layout
        (folder / name).unlink(missing_ok=True)


def _config_difference(saved: dict, cfg: FinetuneConfig) -> str:
    now = asdict(cfg)
    keys = sorted(set(saved) | set(now))
    return ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys
                     if saved.get(k) != now.get(k))


def _check_base(found: Path, manifest: dict, base: dict | None) -> None:
    then = manifest.get("base") or {}
    if not base or not then or then.get("sha256") == base.get("sha256"):
        return
    raise ValueError(f"resume: the checkpoint {found} was fine-tuned from other pretrained weights: "
                     f"{then.get('source', '?')} (sha256 {then['sha256'][:12]}) then, {base.get('source', '?')} "
                     f"(sha256 {base['sha256'][:12]}) now; pass the original weights to resume it, or --no-resume "
                     f"(resume=False) to start over, which discards it")


def load_checkpoint(folder: Path, net, opt, sched, cfg: FinetuneConfig, *, base: dict | None = None
                    ) -> tuple[int, dict]:
    """Load the newest complete checkpoint into ``net``, ``opt`` and ``sched``; returns
    ``(its step, its extra state)``, or ``(0, {})`` when there is none. Refuses one made
    with another configuration or from other base weights."""
    from safetensors.torch import load_file

    found = latest(folder)
    if found is None:
        return 0, {}
    directory, manifest = found
    saved = json.loads((directory / "config.json").read_text())
    if saved != asdict(cfg):
        raise ValueError(f"resume: the checkpoint {directory} was made with another configuration "
                         f"({_config_difference(saved, cfg)}); rerun with the checkpoint's options to resume it, "
                         f"or with --no-resume (resume=False) to start over, which discards it")
    _check_base(directory, manifest, base)
    device = next(iter(net.parameters())).device
    net.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(device)))
    state = torch.load(directory / "train_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), dict(state.get("extra") or {})


def checkpoint(folder, trained, opt, sched, step, cfg, rank, distributed, *, base=None, extra=None) -> None:
    """Rank 0 saves; every rank waits for it (so no rank runs ahead of a checkpoint)."""
    if rank == 0:
        save_checkpoint(folder, trained, opt, sched, step, cfg, base=base, extra=extra)
    if distributed:
        torch.distributed.barrier()
