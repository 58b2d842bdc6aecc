"""Checkpoints of a fine-tuning run: the trained state (safetensors), optimizer and schedule
(``torch.load(weights_only=True)``) and the configuration, and resume from them."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .config import FinetuneConfig


def save_checkpoint(path: Path, net: nn.Module, opt, sched, step: int, cfg: FinetuneConfig) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(state, str(path / "model.safetensors.tmp"), metadata={"step": str(step)})
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
               path / "train_state.pt.tmp")
    (path / "model.safetensors.tmp").replace(path / "model.safetensors")
    (path / "train_state.pt.tmp").replace(path / "train_state.pt")
    (path / "config.json").write_text(json.dumps(asdict(cfg), indent=1))


def load_checkpoint(path: Path, net, opt, sched, cfg: FinetuneConfig) -> int:
    from safetensors.torch import load_file

    saved = json.loads((path / "config.json").read_text())
    if saved != asdict(cfg):
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
        raise ValueError(f"resume: the checkpoint in {path} was made with another configuration: {diff}")
    device = next(iter(net.parameters())).device
    net.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    state = torch.load(path / "train_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def checkpoint(path, trained, opt, sched, step, cfg, rank, distributed) -> None:
    if rank == 0:
        save_checkpoint(path, trained, opt, sched, step, cfg)
    if distributed:
        torch.distributed.barrier()
