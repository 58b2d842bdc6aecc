"""LoRA: the exact low-rank OrthoReg penalty (torch and Triton) against the dense definition in
float64; add_lora / lora_delta_weights / merge_lora / attention_only on open_clip ViTs, on
models with separate q/k/v/o layers, and on PEFT-style adapted models."""
import copy
import math

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.ops.lora import lora_ortho_penalty

from conftest import TOL, rel_err, requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
# (out, in, rank): tall, wide, square, rank 1, rank above a tiny k, odd sizes.
SHAPES = [(33, 17, 4), (17, 33, 4), (65, 130, 16), (130, 65, 33), (1, 37, 1), (48, 48, 64),
          (257, 96, 7), (33, 17, 4)]


def adapters(shapes, seed=0, dtype=torch.float32, amplitude=1.0):
    """Random A, B and scales whose D = s B A has entries ~ amplitude / sqrt(max(out, in)),
    so the Gram is of order one and the penalty is not dominated by its constant."""
    gen = torch.Generator().manual_seed(seed)
    As, Bs, scales = [], [], []
    for i, (out, inn, r) in enumerate(shapes):
        s = [0.5, 2.0, 1.0, 0.25][i % 4]
        a = torch.randn(r, inn, generator=gen, dtype=torch.float64) * r ** -0.25
        b = torch.randn(out, r, generator=gen, dtype=torch.float64) * r ** -0.25
        b *= amplitude / (s * max(out, inn) ** 0.5)
        As.append(a.to(dtype=dtype, device=DEVICE))
        Bs.append(b.to(dtype=dtype, device=DEVICE))
        scales.append(s)
    return As, Bs, scales


def run(As, Bs, scales, squared, precision, backend, upstream):
    a = [t.detach().clone().requires_grad_(True) for t in As]
    b = [t.detach().clone().requires_grad_(True) for t in Bs]
    values = lora_ortho_penalty(a, b, scales, squared=squared, precision=precision, backend=backend)
    (values * upstream).sum().backward()
    return values, [t.grad for t in a], [t.grad for t in b]


def check_against_dense(As, Bs, scales, squared, precision, backend, tol):
    upstream = torch.linspace(-1.0, 2.0, len(As), device=DEVICE)
    values, grads_a, grads_b = run(As, Bs, scales, squared, precision, backend, upstream)
    assert values.dtype == torch.float32 and values.shape == (len(As),)
    ref_values = torch.stack([ref.lora_layer_penalty(a.double(), b.double(), s, squared)
                              for a, b, s in zip(As, Bs, scales)])
    assert rel_err(values, ref_values) <= tol
    for i, (a, b, s) in enumerate(zip(As, Bs, scales)):
        ga, gb = ref.lora_layer_penalty_grads(a.double(), b.double(), s, squared)
        u = float(upstream[i])
        assert grads_a[i].dtype == a.dtype and grads_b[i].dtype == b.dtype
        assert rel_err(grads_a[i], u * ga) <= tol, f"grad A of adapter {i} {tuple(b.shape)}x{tuple(a.shape)}"
        assert rel_err(grads_b[i], u * gb) <= tol, f"grad B of adapter {i}"


def test_dense_reference_gradients_match_autograd():
    As, Bs, scales = adapters(SHAPES[:4])
    for a, b, s in zip(As, Bs, scales):
        a, b = a.double().requires_grad_(True), b.double().requires_grad_(True)
        ref.lora_layer_penalty(a, b, s).backward()
        ga, gb = ref.lora_layer_penalty_grads(a.detach(), b.detach(), s)
        assert rel_err(a.grad, ga) < 1e-12 and rel_err(b.grad, gb) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("squared", [True, False])
def test_low_rank_penalty_matches_dense_reference(backend, squared):
    As, Bs, scales = adapters(SHAPES, seed=1)
    check_against_dense(As, Bs, scales, squared, "ieee", backend, TOL["ieee"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 2, 8, 16, 17, 64])
def test_ranks_wide_and_tall(backend, rank):
    shapes = [(96, 40 + rank, rank), (40 + rank, 96, rank)]
    As, Bs, scales = adapters(shapes, seed=rank)
    check_against_dense(As, Bs, scales, True, "ieee", backend, TOL["ieee"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_modes(backend, precision):
    # (bf16 under the Triton interpreter is emulated by exact bit rounding: still checked)
    As, Bs, scales = adapters(SHAPES, seed=2, amplitude=0.5)
    check_against_dense(As, Bs, scales, True, precision, backend, TOL[precision])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_init_adapter_gives_k_and_zero_gradient(backend):
    """B = 0 (LoRA's initialization): D = 0, the penalty is k, and the gradients vanish."""
    As, Bs, scales = adapters([(40, 24, 8), (24, 40, 8)])
    Bs = [torch.zeros_like(b) for b in Bs]
    for squared in (True, False):
        values, ga, gb = run(As, Bs, scales, squared, "ieee", backend, torch.ones(2, device=DEVICE))
        expected = torch.tensor([24.0, 24.0]) if squared else torch.tensor([24.0, 24.0]).sqrt()
        assert torch.allclose(values.cpu(), expected)
        assert all(torch.count_nonzero(g) == 0 for g in ga + gb)



def test_triton_kernels_write_every_output():
    pytest.importorskip("triton")
    from fastortho.kernels import lora_orthoreg as K

    As, Bs, scales = adapters(SHAPES, seed=3)
    cfg = K.LoRAConfig(block=16, num_warps=4)
    from fastortho.kernels.layout import lora_grad_views

    # The outputs are NaN-poisoned at allocation (tests/conftest.py).
    values, small = K.lora_penalty(As, Bs, tuple(scales), "ieee", config=cfg)
    assert torch.isfinite(small).all() and torch.isfinite(values).all()
    coef = torch.linspace(-1.0, 2.0, len(As), device=DEVICE)
    flat = K.lora_grad(As, Bs, tuple(scales), small, coef, "ieee", config=cfg)
    assert torch.isfinite(flat).all()
    grads_a, grads_b = lora_grad_views(flat, [(b.shape[0], a.shape[1], a.shape[0]) for a, b in zip(As, Bs)])
    for i, (a, b, s) in enumerate(zip(As, Bs, scales)):
        assert rel_err(values[i], ref.lora_layer_penalty(a.double(), b.double(), s)) <= TOL["ieee"]
        ga, gb = ref.lora_layer_penalty_grads(a.double(), b.double(), s)
        assert rel_err(grads_a[i], float(coef[i]) * ga) <= TOL["ieee"]
        assert rel_err(grads_b[i], float(coef[i]) * gb) <= TOL["ieee"]


def test_registered_ops_pass_opcheck():
    from fastortho.ops.lora.torch_backend import lora_grad_torch, lora_ortho_torch

    As, Bs, scales = adapters(SHAPES[:4], seed=4)
    As = [a.requires_grad_(True) for a in As]
    Bs = [b.requires_grad_(True) for b in Bs]
    torch.library.opcheck(lora_ortho_torch, (As, Bs, scales, True, "ieee", True))
    torch.library.opcheck(lora_ortho_torch, (As, Bs, scales, False, "ieee", False))
    _, nes, ems = lora_ortho_torch([a.detach() for a in As], [b.detach() for b in Bs], scales, True, "ieee", True)
    coefs = [torch.ones(1, device=DEVICE)] * len(nes)
    torch.library.opcheck(
        lora_grad_torch, ([a.detach() for a in As], [b.detach() for b in Bs], nes, ems, coefs, "ieee")
    )


def test_triton_registered_ops_pass_opcheck():
    pytest.importorskip("triton")
    from fastortho.ops.lora.triton_backend import lora_grad_triton, lora_ortho_triton

    As, Bs, scales = adapters(SHAPES[:4], seed=4)
    grad_inputs = ([a.clone().requires_grad_(True) for a in As], [b.clone().requires_grad_(True) for b in Bs])
    torch.library.opcheck(lora_ortho_triton, (*grad_inputs, scales, True, "ieee"))
    _, small = lora_ortho_triton(As, Bs, scales, True, "ieee")
    coef = torch.linspace(0.5, 1.5, len(As), device=DEVICE)
    torch.library.opcheck(lora_grad_triton, (As, Bs, scales, small, coef, "ieee"))


# ----------------------------------------------------------------------------- models

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def randomize_adapters(model, std=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in fo.lora_adapters(model):
            ad.B.copy_(torch.randn(ad.B.shape, generator=gen) * std)


@pytest.mark.parametrize("targets,per_block,trainable_per_block", [
    # rank 8: each adapter has 8 * (out + in) parameters
    ("qkvofp", 6, 8 * (4 * 2 * 768 + 2 * (768 + 3072))),
    ("qkvo", 4, 8 * 8 * 768),
    ("qkv", 3, 8 * 6 * 768),
    ("qv", 2, 8 * 4 * 768),
    ("q-v-", 2, 8 * 4 * 768),
    ("fp", 2, 8 * 2 * (768 + 3072)),
])
def test_add_lora_targets_on_open_clip(vit_b32, images, targets, per_block, trainable_per_block):
    model = fo.add_lora(copy.deepcopy(vit_b32), targets, rank=8, alpha=16)
    adapters_ = fo.lora_adapters(model)
    assert len(adapters_) == 12 * per_block
    assert all(ad.scale == 2.0 and ad.A.shape[0] == 8 for ad in adapters_)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == 12 * trainable_per_block
    with torch.no_grad():  # unchanged at initialization
        assert torch.equal(model(images), vit_b32(images))


def test_fused_qkv_reproduces_released_single_adapter(vit_b32):
    model = fo.add_lora(copy.deepcopy(vit_b32), "qkvo", rank=4, fused_qkv=True)
    adapters_ = fo.lora_adapters(model)
    assert len(adapters_) == 24
    fused = [ad for ad in adapters_ if ad.weight_name.endswith("in_proj_weight")]
    assert all(ad.B.shape == (3 * 768, 4) and ad.rows is None for ad in fused)
    with pytest.raises(ValueError, match="fused_qkv"):
        fo.add_lora(copy.deepcopy(vit_b32), "qv", fused_qkv=True)


def test_delta_weights_merge_and_outputs_agree(vit_b32, images):
    model = fo.add_lora(copy.deepcopy(vit_b32), "qvo", rank=4)
    randomize_adapters(model)
    with torch.no_grad():
        y_lora = model(images)
    deltas = fo.lora_delta_weights(model)
    assert len(deltas) == 24 and all(not d.requires_grad for d in deltas.values())
    # k rows of in_proj_weight have no adapter: exact zeros there
    in_proj = deltas["transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.count_nonzero(in_proj[768:1536]) == 0 and torch.count_nonzero(in_proj[:768]) > 0
    state = {k: v.clone() for k, v in vit_b32.state_dict().items()}
    for k, d in deltas.items():
        state[k] += d
    plain = copy.deepcopy(vit_b32)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(plain(images), y_lora, atol=1e-5, rtol=1e-5)
    fo.merge_lora(model)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in vit_b32.named_parameters()}
    assert not fo.lora_adapters(model)
    with torch.no_grad():
        assert torch.allclose(model(images), y_lora, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no fastortho LoRA adapters"):
        fo.merge_lora(model)


@pytest.mark.parametrize("squared", [True, False])
def test_ortho_loss_on_lora_model_matches_dense(vit_b32, squared):
    model = fo.add_lora(copy.deepcopy(vit_b32), "qkvofp", rank=8).train()
    randomize_adapters(model, std=0.02, seed=3)
    loss = fo.ortho_loss(model, squared=squared)
    loss.backward()
    adapters_ = fo.lora_adapters(model)
    expected = sum(ref.lora_layer_penalty(ad.A.detach().double(), ad.B.detach().double(), ad.scale, squared)
                   for ad in adapters_)
    assert rel_err(loss, expected) <= TOL["ieee"]
    for ad in adapters_[::7]:
        ga, gb = ref.lora_layer_penalty_grads(ad.A.detach().double(), ad.B.detach().double(), ad.scale, squared)
        assert rel_err(ad.A.grad, ga) <= TOL["ieee"] and rel_err(ad.B.grad, gb) <= TOL["ieee"]
    reg = fo.OrthoReg(model, lam=0.5, squared=squared)
    assert len(reg.names) == len(adapters_)
    assert rel_err(reg(), 0.5 * expected) <= TOL["ieee"]


def test_ortho_loss_lora_errors(vit_b32):
    model = fo.add_lora(copy.deepcopy(vit_b32), "qv", rank=4)
    with pytest.raises(ValueError, match="base: model has 24 LoRA adapters"):
        fo.ortho_loss(model, fo.snapshot(vit_b32))
    with pytest.raises(ValueError, match="layers='attention'"):
        fo.ortho_loss(model, layers="attention")
    with pytest.raises(ValueError, match="base: required"):
        fo.ortho_loss(copy.deepcopy(vit_b32))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        fo.add_lora(model, "qv")
    with torch.no_grad():
        fo.lora_adapters(model)[3].B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lora_B of adapter"):
        fo.ortho_loss(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets="qx"), "targets"), (dict(targets=""), "targets"), (dict(targets="qq"), "targets"),
    (dict(targets=3), "targets"), (dict(rank=0), "rank"), (dict(rank=2.0), "rank"),
    (dict(rank=1000), "rank: 1000 exceeds"), (dict(alpha=-1), "alpha"),
])
def test_add_lora_bad_arguments(kwargs, match):
    model = TinyTransformer()
    with pytest.raises((ValueError, TypeError), match=match):
        fo.add_lora(model, **kwargs)


def test_attention_only_on_open_clip(vit_b32):
    model, report = fo.attention_only(copy.deepcopy(vit_b32))
    expected = 12 * (3 * 768 * 768 + 768 * 768)
    assert report.trainable == expected and len(report.names) == 24
    assert report.total == sum(p.numel() for p in vit_b32.parameters())
    assert all(n.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for n in report.names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "bias" in n)
    assert "24 trainable tensors" in str(report)
    with pytest.raises(ValueError, match="no attention projection"):
        fo.attention_only(nn.Sequential(nn.Linear(4, 4)))


# A model with separate q/k/v/o nn.Linear layers (the Hugging Face CLIP layout).
class ToyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.heads = 2

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class ToyMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TinyTransformer(nn.Module):
    def __init__(self, d=24, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"self_attn": ToyAttention(d), "mlp": ToyMLP(d)}) for _ in range(depth)
        )
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk["self_attn"](x)
            x = x + blk["mlp"](x)
        return self.head(x)


def test_separate_projection_layout():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(2, 5, 24)
    y0 = model(x)
    lora = fo.add_lora(copy.deepcopy(model), "qkvofp", rank=4, alpha=8)
    assert len(fo.lora_adapters(lora)) == 12
    assert torch.allclose(lora(x), y0)
    randomize_adapters(lora, std=0.3)
    y1 = lora(x)
    deltas = fo.lora_delta_weights(lora)
    assert set(deltas) == {f"blocks.{i}.{m}.weight" for i in range(2)
                           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    merged = fo.merge_lora(copy.deepcopy(lora))
    assert torch.allclose(merged(x), y1, atol=1e-6)
    _, report = fo.attention_only(copy.deepcopy(model))
    assert len(report.names) == 8 and report.trainable == 2 * 4 * 24 * 24


def test_peft_adapters_are_read():
    """Hugging Face PEFT's own LoRA layers (tests/test_peft_hf.py: on open_clip's and
    transformers' CLIP)."""
    peft_lib = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = TinyTransformer()
    peft = peft_lib.get_peft_model(copy.deepcopy(model), peft_lib.LoraConfig(
        r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # B != 0
    x = torch.randn(2, 5, 24)
    adapters_ = fo.lora_adapters(peft)
    assert len(adapters_) == 4 and all(ad.scale == 2.0 for ad in adapters_)
    deltas = fo.lora_delta_weights(peft)
    assert set(deltas) == {f"blocks.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, d in deltas.items():
        state[k] += d
    plain = copy.deepcopy(model)
    plain.load_state_dict(state)
    assert torch.allclose(plain(x), peft(x), atol=1e-5)
    loss = fo.ortho_loss(peft, squared=False)
    loss.backward()
    expected = sum(ref.lora_layer_penalty(ad.A.detach().double(), ad.B.detach().double(), ad.scale, False)
                   for ad in adapters_)
    assert rel_err(loss, expected) <= TOL["ieee"]
    with pytest.raises(TypeError, match="merge_and_unload"):
        fo.merge_lora(peft)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vit_l14_shapes_on_gpu(backend):
    shapes = [(1024, 1024, 16)] * 96
    As, Bs, scales = adapters(shapes, seed=5)
    check_against_dense(As, Bs, scales, True, "tf32", backend, TOL["tf32"])


@requires_cuda
def test_lora_ortho_loss_compiles_on_gpu():
    model = TinyTransformer(d=64).cuda()
    fo.add_lora(model, "qkvo", rank=8)
    randomize_adapters(model)
    step = torch.compile(lambda: fo.ortho_loss(model), fullgraph=True)
    value = step()
    value.backward()
    assert math.isfinite(float(value))
