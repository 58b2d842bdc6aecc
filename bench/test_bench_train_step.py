"""What the penalty costs inside a real training step: an open_clip ViT-B-32 visual tower
(random init, nothing downloaded) with a linear head, AdamW, bf16 autocast on a GPU (fp32 on
a CPU), with no regularizer, fastortho's penalty, and the released-code penalty."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastortho as fo
from conftest import DEVICE, sync
from fastortho import reference as ref

open_clip = pytest.importorskip("open_clip")

BATCH = 128 if DEVICE == "cuda" else 4
CASES = ["none", "torch-tf32", "triton-tf32", "triton-bf16", "released"]


@pytest.fixture(scope="module")
def training():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.to(DEVICE)
    base = fo.snapshot(model)
    head = torch.randn(model.output_dim, 10, device=DEVICE) / model.output_dim ** 0.5
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, base, head, x, y, opt


@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, training, case):
    model, base, head, x, y, opt = training
    if DEVICE != "cuda" and case not in ("none", "torch-tf32"):
        pytest.skip("on a CPU only the plain step and the torch backend are timed")
    penalty = None
    if case.startswith(("torch", "triton")):
        backend, precision = case.split("-")
        penalty = fo.OrthoReg(model, base, lam=0.1, squared=False, precision=precision,
                              backend=backend, check_finite=False)
    elif case == "released":
        penalty = lambda: 0.1 * ref.released_ortho_loss(model, base)  # noqa: E731
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda"
                else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy((model(x) @ head).float(), y)
            if penalty is not None:
                loss = loss + penalty()
        loss.backward()
        opt.step()
        sync()

    benchmark.group = f"train-step-ViT-B-32-b{BATCH}"
    benchmark.extra_info.update(model="ViT-B-32", batch=BATCH, case=case,
                                autocast="bf16" if DEVICE == "cuda" else "none")
    for _ in range(2):
        step()
    benchmark.pedantic(step, rounds=15 if DEVICE == "cuda" else 3, iterations=1, warmup_rounds=1)
