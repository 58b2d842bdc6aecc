"""What the penalty costs inside a real training step: an open_clip visual tower (random init,
nothing downloaded; ViT-B-32 at batch 128 and ViT-L-14 at batch 32 on a GPU, ViT-B-32 at 4 on a
CPU) with a linear head, AdamW, bf16 autocast on a GPU (fp32 on a CPU), with no regularizer,
fastortho's penalty per backend and precision (``auto``: the precision follows the autocast;
``+check``: with the non-finite check on, as by default), and the released-code penalty."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastortho as fo
from fastortho import reference as ref

from conftest import DEVICE, bench_models, sync

open_clip = pytest.importorskip("open_clip")

BATCH = {"ViT-B-32": 128, "ViT-L-14": 32} if DEVICE == "cuda" else {"ViT-B-32": 4}
# (case id, backend, precision, check_finite)
CASES = [("none", None, None, False), ("torch-tf32", "torch", "tf32", False), ("triton-tf32", "triton", "tf32", False),
         ("triton-bf16", "triton", "bf16", False),
         ("auto", "auto", None, False), ("auto+check", "auto", None, True), ("released", None, None, False)]


@pytest.fixture(scope="module", params=[m for m in bench_models() if m in BATCH])
def training(request):
    torch.manual_seed(0)
    name = request.param
    model = open_clip.create_model(name, pretrained=None).visual.to(DEVICE)
    base = fo.snapshot(model)
    head = torch.randn(model.output_dim, 10, device=DEVICE) / model.output_dim ** 0.5
    x = torch.randn(BATCH[name], 3, 224, 224, device=DEVICE)
    y = torch.randint(0, 10, (BATCH[name],), device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return name, model, base, head, x, y, opt


@pytest.mark.parametrize("case,backend,precision,check", CASES, ids=[c[0] for c in CASES])
def test_train_step(benchmark, training, case, backend, precision, check):
    name, model, base, head, x, y, opt = training
    if DEVICE != "cuda" and case not in ("none", "torch-tf32"):
        pytest.skip("on a CPU only the plain step and the torch backend are timed")
    penalty = None
    if backend is not None:
        penalty = fo.OrthoReg(model, base, lam=0.1, squared=False, precision=precision,
                              backend=backend, check_finite=check)
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

    benchmark.group = f"train-step-{name}-b{x.shape[0]}"
    benchmark.extra_info.update(model=name, batch=x.shape[0], case=case, check_finite=check,
                                autocast="bf16" if DEVICE == "cuda" else "none")
    for _ in range(2):
        step()
    benchmark.pedantic(step, rounds=15 if DEVICE == "cuda" else 3, iterations=1, warmup_rounds=1)
