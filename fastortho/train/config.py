"""The fine-tuning configuration (the papers' defaults) and the result of one run."""
from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_count, check_real
from ..task_vectors import TaskVector

MODES = ("nonlinear", "linear", "attention", "lora")
REGULARIZERS = ("none", "orthoreg", "taujp-strict", "taujp-cyclical")


@dataclass
class FinetuneConfig:
    """The paper defaults: 2,000 steps, batch 128, lr 1e-5, weight decay 0.1, 200 warm-up steps."""
    mode: str = "nonlinear"
    reg: str = "none"
    lam: float = 0.1
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 200
    accumulation: int = 1
    autocast: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "none"
    lora_targets: str = "qkvo"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    taujp_batch: int = 16  # images per other task per step
    taujp_form: str = "released"  # "released" (mean norms, mean over tasks) or "paper" (Eq. 10: sums of squares)
    ortho_precision: str = "auto"  # OrthoReg's matmul mode: "auto" (follows autocast), "ieee", "tf32", "bf16"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end

    def check(self) -> FinetuneConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.reg not in REGULARIZERS:
            raise ValueError(f"reg: expected one of {REGULARIZERS}, got {self.reg!r}")
        for name in ("steps", "batch_size", "accumulation", "lora_rank", "taujp_batch"):
            check_count(name, getattr(self, name), minimum=1)
        check_count("warmup", self.warmup)
        check_count("seed", self.seed)
        check_count("checkpoint_every", self.checkpoint_every)  # 0: only at the end
        check_real("lr", self.lr, positive=True)
        check_real("lam", self.lam, minimum=0)
        check_real("weight_decay", self.weight_decay, minimum=0)
        check_real("lora_alpha", self.lora_alpha, positive=True)
        if self.taujp_form not in ("released", "paper"):
            raise ValueError(f"taujp_form: expected 'released' or 'paper', got {self.taujp_form!r}")
        if self.ortho_precision not in ("auto", "ieee", "tf32", "bf16"):
            raise ValueError(
                f"ortho_precision: expected 'auto', 'ieee', 'tf32' or 'bf16', got {self.ortho_precision!r}"
            )
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast: expected 'auto', 'bf16' or 'none', got {self.autocast!r}")
        return self


@dataclass
class FinetuneResult:
    task_vector: TaskVector
    steps: int
    wall_time_s: float
    memory_bytes: int
    memory_measure: str
    final_loss: float
