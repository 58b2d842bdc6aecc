"""fastortho.ortho_loss / OrthoReg on the torch backend against reference.py in float64."""
import math

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.ops.orthoreg import ortho_penalty
from fastortho.testing import random_layers

from conftest import TOL, fast_values_and_grads, reference_values_and_grads, rel_err, requires_cuda

AWKWARD = [(1, 37), (37, 1), (33, 17), (17, 33), (65, 130), (130, 65), (31, 31), (1, 1)]


def check_against_reference(shapes, squared, precision, dtype=torch.float32, scale=None, seed=0,
                            device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    if precision != "ieee" and scale is None:
        # tf32/bf16 operands carry 5e-4/4e-3 relative error into G; with G ~ I (the default
        # scale) it is amplified in G - I. Half the scale keeps G - I of order 1, as in
        # fine-tuning, where updates are small.
        weights, bases = [], []
        for shape in shapes:
            w, b = random_layers([shape], dtype=dtype, scale=0.5 * max(shape) ** -0.5, generator=gen)
            weights += w
            bases += b
    else:
        weights, bases = random_layers(shapes, dtype=dtype, scale=scale, generator=gen)
    weights, bases = [w.to(device) for w in weights], [b.to(device) for b in bases]
    values, grads = fast_values_and_grads(weights, bases, squared, precision)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, squared)
    assert values.dtype == torch.float32 and values.shape == (len(shapes),)
    tol = TOL[precision] if dtype == torch.float32 else max(TOL[precision], TOL["bf16"])
    assert rel_err(values, ref_values) <= TOL[precision], (shapes, rel_err(values, ref_values))
    for shape, g, rg in zip(shapes, grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert rel_err(g, rg) <= tol, (shape, rel_err(g, rg))


@pytest.mark.parametrize("shape", AWKWARD)
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_single_layer_matches_reference(shape, squared, precision):
    check_against_reference([shape], squared, precision, seed=hash((shape, squared)) % 1000)


@pytest.mark.parametrize("squared", [True, False])
def test_mixed_shapes_and_repeated_shapes_in_one_call(squared):
    shapes = [(33, 17), (1, 37), (33, 17), (65, 130), (17, 33), (33, 17), (65, 130)]
    check_against_reference(shapes, squared, "ieee", seed=3)


@requires_cuda
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("squared", [True, False])
def test_torch_backend_on_cuda_groups_by_shape(precision, squared):
    shapes = [(33, 17), (1, 37), (33, 17), (65, 130), (17, 33), (33, 17), (768, 3072), (768, 3072)]
    check_against_reference(shapes, squared, precision, seed=4, device="cuda")


@pytest.mark.parametrize("shape", [(257, 1024), (768, 3072), (3072, 768), (530, 700)])
def test_vit_sized_layers(shape):
    check_against_reference([shape], True, "ieee", seed=5)


@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_small_and_large_updates(scale):
    # tiny updates: the penalty is ~k and the gradient ~ -4D; large: ||G||^2 dominates.
    check_against_reference([(65, 130), (40, 24)], True, "ieee", scale=scale, seed=7)


def test_near_orthogonal_update_has_no_cancellation():
    # D with orthonormal columns: G = I, penalty ~ 0. The kernel subtracts I from G before
    # squaring, so the tiny remainder is still computed to fp32 relative accuracy in G - I.
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(96, 40, dtype=torch.float64, generator=gen))
    d = q + 1e-3 * torch.randn(96, 40, dtype=torch.float64, generator=gen)
    w0 = 0.02 * torch.randn(96, 40, dtype=torch.float64, generator=gen)
    weights, bases = [(w0 + d).float()], [w0.float()]
    values, grads = fast_values_and_grads(weights, bases, True, "ieee")
    ref_values, ref_grads = reference_values_and_grads(weights, bases, True)
    assert ref_values.item() < 1e-2
    assert rel_err(values, ref_values) <= 1e-3
    assert rel_err(grads[0], ref_grads[0]) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    check_against_reference([(33, 17), (17, 65), (33, 17)], True, "ieee", dtype=dtype, seed=13)


def test_base_in_another_dtype_is_fine():
    gen = torch.Generator().manual_seed(17)
    weights, bases = random_layers([(40, 24), (24, 40)], generator=gen)
    bases16 = [b.to(torch.bfloat16) for b in bases]
    values, grads = fast_values_and_grads(weights, bases16, True, "ieee")
    ref_values, ref_grads = reference_values_and_grads(weights, bases16, True)
    assert rel_err(values, ref_values) <= TOL["ieee"]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= TOL["ieee"]


def test_upstream_gradient_scales_each_layer():
    gen = torch.Generator().manual_seed(19)
    shapes = [(33, 17), (33, 17), (17, 9)]
    weights, bases = random_layers(shapes, generator=gen)
    upstream = torch.tensor([0.5, -2.0, 3.0])
    _, grads = fast_values_and_grads(weights, bases, False, "ieee", upstream=upstream)
    _, ref_grads = reference_values_and_grads(weights, bases, False)
    for u, g, rg in zip(upstream, grads, ref_grads):
        assert rel_err(g, u.double() * rg) <= TOL["ieee"]


# ----------------------------------------------------------------- model-level API


class TinyAttention(nn.Module):
    """Separate q/k/v/o projections, as in Hugging Face CLIPAttention."""

    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)


class TinyBlock(nn.Module):
    def __init__(self, dim=12, heads=3):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads)
        self.self_attn = TinyAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim + 1), nn.Linear(2 * dim + 1, dim)
        self.pos = nn.Parameter(torch.randn(5, dim))
        self.conv = nn.Conv2d(3, dim, 2)
        self.norm = nn.LayerNorm(dim)


def perturbed(model, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_layer_modes_select_the_documented_tensors():
    model = TinyBlock()
    chosen = lambda layers: [n for n, _ in fo.select_parameters(model, layers)]  # noqa: E731
    assert chosen("trainable-2d") == ["pos", "mha.in_proj_weight", "mha.out_proj.weight",
                                      "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.out_proj.weight",
                                      "fc1.weight", "fc2.weight"]
    assert chosen("linear") == chosen("trainable-2d")[1:]
    assert chosen("attention") == chosen("trainable-2d")[1:7]
    assert chosen(lambda n, p: n.startswith("fc") and n.endswith("weight")) == ["fc1.weight", "fc2.weight"]
    model.fc1.weight.requires_grad_(False)
    assert "fc1.weight" not in chosen("linear")


@pytest.mark.parametrize("layers", ["trainable-2d", "linear", "attention", lambda n, p: "fc" in n and p.dim() == 2])
@pytest.mark.parametrize("squared", [True, False])
def test_ortho_loss_matches_reference_for_every_layer_mode(layers, squared):
    torch.manual_seed(1)
    model = TinyBlock()
    base = fo.snapshot(model, layers)
    perturbed(model, seed=2)
    names = [n for n, _ in fo.select_parameters(model, layers)]
    loss = fo.ortho_loss(model, base, squared=squared, layers=layers)
    loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(fast_grads) == sorted(names)
    model.zero_grad()
    expected = ref.ortho_penalty(model, base, squared=squared, select=lambda n, p: n in names)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, expected) <= TOL["ieee"]
    for n, p in model.named_parameters():
        if n in names:
            assert rel_err(fast_grads[n], p.grad) <= TOL["ieee"], n


def test_base_forms_agree():
    torch.manual_seed(3)
    model = TinyBlock()
    pretrained = TinyBlock()
    pretrained.load_state_dict(model.state_dict())
    snap, state = fo.snapshot(model), {k: v.clone() for k, v in model.state_dict().items()}
    perturbed(model, seed=4)
    losses = [fo.ortho_loss(model, b) for b in (snap, state, pretrained)]
    assert losses[0].item() == losses[1].item() == losses[2].item()
    losses[2].backward()
    assert all(p.grad is None for p in pretrained.parameters())


def test_snapshot_is_a_frozen_copy_of_only_the_selected_weights(tmp_path):
    model = TinyBlock()
    snap = fo.snapshot(model, "attention")
    assert list(snap) == [n for n, _ in fo.select_parameters(model, "attention")]
    before = snap["mha.in_proj_weight"].clone()
    perturbed(model)
    assert torch.equal(snap["mha.in_proj_weight"], before)
    assert not snap["mha.in_proj_weight"].requires_grad
    snap.save(tmp_path / "base.safetensors")
    loaded = fo.Snapshot.load(tmp_path / "base.safetensors")
    assert list(loaded) == list(snap) and loaded.layers == "attention"
    assert all(torch.equal(loaded[n], snap[n]) for n in snap)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a readable safetensors file"):
        fo.Snapshot.load(tmp_path / "other.pt")


def test_gradient_accumulates_over_several_backward_calls():
    torch.manual_seed(5)
    model = TinyBlock()
    base = fo.snapshot(model)
    perturbed(model, seed=6)
    fo.ortho_loss(model, base).backward()
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fo.ortho_loss(model, base).backward()
    (0.5 * fo.ortho_loss(model, base)).backward()
    for n, p in model.named_parameters():
        if n in once:
            assert torch.allclose(p.grad, 2.5 * once[n], rtol=1e-5, atol=1e-6), n


def test_orthoreg_module_equals_scaled_functional_form():
    torch.manual_seed(7)
    model = TinyBlock()
    base = fo.snapshot(model, "linear")
    perturbed(model, seed=8)
    reg = fo.OrthoReg(model, base, lam=0.25, squared=False, layers="linear")
    assert reg.names == [n for n, _ in fo.select_parameters(model, "linear")]
    assert list(reg.parameters()) == []  # the model's parameters are not re-registered
    value = reg()
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = 0.25 * fo.ortho_loss(model, base, squared=False, layers="linear")
    expected.backward()
    assert torch.allclose(value, expected)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad), n
    assert reg.layer_values().shape == (len(reg.names),)


def test_trainable_bf16_model_gets_bf16_gradients():
    torch.manual_seed(9)
    model = TinyBlock().to(torch.bfloat16)
    base = fo.snapshot(model)
    perturbed(model, seed=10)
    loss = fo.ortho_loss(model, base)
    loss.backward()
    assert loss.dtype == torch.float32
    expected = ref.ortho_penalty(model, base)
    assert rel_err(loss, expected) <= TOL["ieee"]
    model64 = TinyBlock().double()
    model64.load_state_dict(model.state_dict())
    ref.ortho_penalty(model64, base).backward()
    g64 = dict(model64.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.bfloat16
            assert rel_err(p.grad, g64[n].grad) <= TOL["bf16"], n


def test_precision_none_follows_torch_setting(restore_matmul_precision):
    from fastortho.ops._common import resolve_precision

    for torch_mode, ours in (("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")):
        torch.set_float32_matmul_precision(torch_mode)
        assert resolve_precision(None) == ours
    torch.set_float32_matmul_precision("medium")
    gen = torch.Generator().manual_seed(21)
    weights, bases = random_layers([(40, 24)], generator=gen)
    default = ortho_penalty(weights, bases, squared=True, precision=resolve_precision(None), backend="torch")
    as_bf16 = ortho_penalty(weights, bases, squared=True, precision="bf16", backend="torch")
    as_ieee = ortho_penalty(weights, bases, squared=True, precision="ieee", backend="torch")
    assert torch.equal(default, as_bf16) and not torch.equal(default, as_ieee)


# ----------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_parameter():
    model = TinyBlock()
    base = fo.snapshot(model)
    state = dict(base)
    with pytest.raises(ValueError, match="base is missing 1 key.*'fc2.weight'"):
        fo.ortho_loss(model, {k: v for k, v in state.items() if k != "fc2.weight"})
    with pytest.raises(ValueError, match=r"base\['fc1.weight'\]: shape"):
        fo.ortho_loss(model, {**state, "fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"base\['fc1.weight'\] is on meta"):
        fo.ortho_loss(model, {**state, "fc1.weight": state["fc1.weight"].to("meta")})
    with pytest.raises(TypeError, match=r"base\['fc1.weight'\]: expected a floating"):
        fo.ortho_loss(model, {**state, "fc1.weight": state["fc1.weight"].long()})
    with pytest.raises(TypeError, match="base: expected"):
        fo.ortho_loss(model, [1, 2, 3])
    with pytest.raises(ValueError, match="base: got the model itself"):
        fo.ortho_loss(model, model)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        fo.ortho_loss(state, base)
    with pytest.raises(ValueError, match="layers: expected one of"):
        fo.ortho_loss(model, base, layers="mlp")
    with pytest.raises(ValueError, match="layers: the predicate selected parameters that are not 2-D"):
        fo.ortho_loss(model, base, layers=lambda n, p: True)
    with pytest.raises(ValueError, match="precision: expected"):
        fo.ortho_loss(model, base, precision="fp8")
    with pytest.raises(ValueError, match="backend: expected"):
        fo.ortho_loss(model, base, backend="jax")
    with pytest.raises(ValueError, match="backend: expected"):
        fo.OrthoReg(model, base, backend="jax")
    frozen = TinyBlock().requires_grad_(False)
    with pytest.raises(ValueError, match="selected no parameter"):
        fo.ortho_loss(frozen, base)
    with pytest.raises(ValueError, match="selected no parameter"):
        fo.snapshot(nn.Sequential(nn.LayerNorm(4)))


@pytest.mark.parametrize("where", ["model", "base"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_reported_by_name(where, bad):
    model = TinyBlock()
    base = dict(fo.snapshot(model))
    perturbed(model)
    if where == "model":
        with torch.no_grad():
            model.fc2.weight[3, 4] = bad
        match = "model parameter 'fc2.weight' has non-finite values"
    else:
        base["fc2.weight"] = base["fc2.weight"].clone()
        base["fc2.weight"][0, 0] = bad
        match = r"base\['fc2.weight'\] has non-finite values"
    with pytest.raises(ValueError, match=match):
        fo.ortho_loss(model, base)
    with pytest.raises(ValueError, match=match):
        fo.OrthoReg(model, base)()
    # opting out returns the non-finite value instead of raising
    assert not torch.isfinite(fo.ortho_loss(model, base, check_finite=False))


# ----------------------------------------------------------------- registration


def test_torch_ops_pass_opcheck():
    from fastortho.ops.orthoreg.torch_backend import ortho_grad_torch, ortho_gram_torch

    gen = torch.Generator().manual_seed(23)
    weights, bases = random_layers([(9, 5), (5, 9), (9, 5)], generator=gen)
    weights = [w.requires_grad_(True) for w in weights]
    for squared in (True, False):
        torch.library.opcheck(ortho_gram_torch, (weights, bases, squared, "ieee", True))
    torch.library.opcheck(ortho_gram_torch, ([w.detach() for w in weights], bases, True, "ieee", False))
    _, deltas, gmis = ortho_gram_torch([w.detach() for w in weights], bases, True, "ieee", True)
    coefs = [torch.rand(d.shape[0]) for d in deltas]
    torch.library.opcheck(ortho_grad_torch, (deltas, gmis, coefs, "ieee"))


@pytest.mark.parametrize("precision", [None, "ieee"])
def test_training_step_compiles_with_fullgraph(precision):
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    base = fo.snapshot(model)
    perturbed(model, seed=26)
    x = torch.randn(5, 8)

    def step(m, b, x):
        return m(x).square().mean() + 0.1 * fo.ortho_loss(m, b, precision=precision)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(model, base, x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = step(model, base, x)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)


def test_import_is_light():
    # `import fastortho` must not import triton or torch._dynamo (no probing at import).
    import subprocess
    import sys

    code = "import sys, fastortho; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_combine_restores_layer_order_and_caches_the_permutation():
    from fastortho.ops import orthoreg as ops

    gen = torch.Generator().manual_seed(11)
    n = 9
    perm = torch.randperm(n, generator=gen).tolist()
    parts_idx = [perm[:2], perm[2:7], perm[7:]]
    truth = torch.randn(n, generator=gen, dtype=torch.float64)
    parts = [(idx, truth[idx]) for idx in parts_idx]
    assert torch.equal(ops.combine(parts, n), truth)
    first = ops._inverse(perm, truth.device)
    assert ops._inverse(perm, truth.device) is first  # reused: no host-to-device copy per step
    with pytest.raises(ValueError, match="cover layers 0..8 once each"):
        ops.combine([(perm[:4], truth[perm[:4]]), (perm[3:], truth[perm[3:]])], n)


# ----------------------------------------------------------------- no host synchronization


@pytest.fixture
def host_reads_forbidden(monkeypatch):
    """Inside the block, the Tensor methods that read a device value on the host (and so wait
    for the GPU) raise."""
    import contextlib

    @contextlib.contextmanager
    def forbid():
        def no_sync(self, *args, **kwargs):
            raise AssertionError("a host synchronization in a steady-state call")
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "tolist", "cpu"):
                m.setattr(torch.Tensor, name, no_sync)
            yield
    return forbid


@pytest.mark.parametrize("kind", ["dense", "lora", "scratch-tf32"])
def test_steady_state_step_reads_nothing_on_the_host(kind, host_reads_forbidden):
    """OrthoReg forward + backward with check_finite on (the default) after a first call
    (scratch-tf32: the scaled fp16 scratch, whose scales live on the device)."""
    model = TinyBlock()
    if kind == "lora":
        fo.add_lora(model, "qkvo", rank=4)
        reg = fo.OrthoReg(model, lam=0.5)
    elif kind == "scratch-tf32":
        pytest.importorskip("triton")
        base = fo.snapshot(model)
        perturbed(model)
        reg = fo.OrthoReg(model, base, lam=0.5, backend="triton", precision="tf32")
    else:
        base = fo.snapshot(model)
        perturbed(model)
        reg = fo.OrthoReg(model, base, lam=0.5, backend="torch")
    reg().backward()  # plans, caches
    with host_reads_forbidden():
        for _ in range(2):
            reg().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_deferred_finite_check_names_the_layer_and_the_call():
    """The GPU way (a flag copied asynchronously, read at a later call), forced on a CPU."""
    model = TinyBlock()
    base = fo.snapshot(model)
    perturbed(model)
    reg = fo.OrthoReg(model, base, backend="torch")
    reg.monitor.defer = True
    reg()  # call 1: fine
    with torch.no_grad():
        model.fc2.weight[1, 2] = math.nan
    reg()  # call 2: bad, not reported yet
    with torch.no_grad():
        model.fc2.weight[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"in call 2, 1 call\(s\) ago"):
        reg()  # call 3 reads call 2's flags
    reg()
    reg.monitor.check()  # nothing pending is bad
    with torch.no_grad():
        model.fc1.weight[0, 0] = math.inf
    reg()
    with pytest.raises(ValueError, match="model parameter 'fc1.weight' has non-finite values"):
        reg.monitor.check()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_precision_follows_autocast_and_nothing_is_recast(backend):
    """Under bf16 autocast precision=None is "bf16"; an explicit precision wins, and no
    backend's products are recast by autocast (ieee stays ieee accurate, tf32 tf32 accurate),
    values and gradients, with backward also run inside the autocast block."""
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(31)
    weights, bases = random_layers([(40, 24), (17, 33)], scale=0.1, generator=gen)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, squared=True)

    def run(precision):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            leaves = [w.clone().requires_grad_(True) for w in weights]
            from fastortho.ops._common import resolve_precision

            mode = resolve_precision(precision, "cpu")
            values = ortho_penalty(leaves, bases, squared=True, precision=mode, backend=backend)
            values.sum().backward()
        return mode, values, [w.grad for w in leaves]

    mode, values, grads = run(None)
    assert mode == "bf16"
    explicit = ortho_penalty([w.clone() for w in weights], bases, squared=True, precision="bf16", backend=backend)
    assert torch.allclose(values, explicit, rtol=1e-6)
    assert rel_err(values, ref_values) <= TOL["bf16"]
    for explicit_mode in ("ieee", "tf32"):
        mode, values, grads = run(explicit_mode)
        assert mode == explicit_mode
        assert rel_err(values, ref_values) <= TOL[explicit_mode]
        for g, rg in zip(grads, ref_grads):
            assert rel_err(g, rg) <= TOL[explicit_mode]


def test_lora_precision_follows_autocast_and_nothing_is_recast():
    from fastortho.ops.lora import lora_ortho_penalty

    gen = torch.Generator().manual_seed(32)
    As = [torch.randn(4, 40, generator=gen) * 0.1, torch.randn(8, 24, generator=gen) * 0.1]
    Bs = [torch.randn(33, 4, generator=gen) * 0.1, torch.randn(20, 8, generator=gen) * 0.1]
    expected = torch.stack([ref.lora_layer_penalty(a.double(), b.double(), 2.0) for a, b in zip(As, Bs)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaves = [a.clone().requires_grad_(True) for a in As]
        values = lora_ortho_penalty(leaves, Bs, [2.0, 2.0], squared=True, precision="ieee", backend="torch")
        values.sum().backward()
    assert rel_err(values, expected) <= TOL["ieee"]
    for a, leaf, b in zip(As, leaves, Bs):
        assert rel_err(leaf.grad, ref.lora_layer_penalty_grads(a.double(), b.double(), 2.0)[0]) <= TOL["ieee"]


def test_replaced_parameters_are_detected_not_silently_regularized():
    """After load_state_dict(assign=True) the model's Parameter objects are new: OrthoReg says
    so instead of returning the penalty of the old tensors (and leaving the new ones' grad None)."""
    model = TinyBlock()
    base = fo.snapshot(model)
    perturbed(model)
    reg = fo.OrthoReg(model, base, backend="torch")
    reg().backward()
    model.load_state_dict({k: v.clone() + 1.0 for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match=r"parameter '[\w.]+' was replaced after OrthoReg was built"):
        reg()
    fresh = fo.OrthoReg(model, base, backend="torch")  # the remedy the message names
    assert torch.isfinite(fresh()).all()


def test_a_malformed_backend_choice_cache_is_measured_again(tmp_path, monkeypatch):
    from fastortho.ops import _measure

    for content in ("[]", "null", '{"key": 3}'):
        path = tmp_path / f"choice-{len(content)}.json"
        path.write_text(content)
        monkeypatch.setattr(_measure, "_memory", {})
        assert _measure.load_table(path) == {}
