"""Linearized models against torch.func.jvp (MATH attention, fast path off) in float64:
outputs, tangents and gradients, on a small open_clip ViT (train and eval mode, GELU and
QuickGELU), MLPs / CNNs, attention variants, and the op fallback; memory, names, files,
input checks and DDP."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.dual import fallback_log
from fastortho.testing import saved_activation_bytes

from conftest import TOL, rel_err

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402

F64_TOL = TOL["float64"]
CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_vit(act=nn.GELU, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
                             output_dim=16, act_layer=act)


def perturb(model, scale=1e-2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3))


def linearized_pair(model):
    """(lin, th0): the model linearized, then moved away from th0 so that tau != 0."""
    lin = fo.linearize(model)
    th0 = {n: t.clone() for n, t in lin.base_values().items()}
    perturb(model)
    return lin, th0


def reference_grads(model, th0, x, loss_of):
    """Gradients of ``loss_of(primal, tangent)`` w.r.t. tau by differentiating through
    torch.func.jvp (the released TTA way)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    taus = [(params[n] - th0[n]).detach().requires_grad_(True) for n in names]
    primal, tangent = ref.jvp_linearized(model, th0, dict(zip(names, taus)), x)
    loss_of(primal, tangent).backward()
    return {n: t.grad for n, t in zip(names, taus)}


def check_model(model, x, tol=F64_TOL, expect_no_fallback=True):
    lin, th0 = linearized_pair(model)
    tau = lin.task_vector()
    with fallback_log() as fallbacks:
        primal, tangent = lin.dual(x)
    if expect_no_fallback:
        assert not fallbacks, f"ops went through the jvp fallback: {fallbacks}"
    ref_primal, ref_tangent = ref.jvp_linearized(model, th0, tau, x)
    assert rel_err(primal, ref_primal) <= tol
    assert rel_err(tangent, ref_tangent) <= tol and ref_tangent.norm() > 0
    assert rel_err(lin(x), ref_primal + ref_tangent) <= tol
    assert rel_err(lin.tangent(x), ref_tangent) <= tol
    with torch.no_grad():
        assert rel_err(lin.primal(x), ref_primal) <= tol
    target = torch.randn_like(ref_primal)
    losses = {
        "on lin(x)": lambda p, t: ((p + t - target) ** 2).sum(),
        "on the tangent alone": lambda p, t: (t ** 3).sum(),
    }
    for what, loss_of in losses.items():
        model.zero_grad(set_to_none=True)
        primal, tangent = lin.dual(x)
        loss_of(primal, tangent).backward()
        expected = reference_grads(model, th0, x, loss_of)
        total = torch.sqrt(sum(e.square().sum() for e in expected.values() if e is not None))
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            e = expected[n] if expected[n] is not None else torch.zeros_like(p)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            # relative per tensor; tensors whose exact gradient is zero (a key bias under
            # softmax) are held to the scale of the whole gradient
            bound = tol * max(float(e.norm()), 1e-4 * float(total))
            assert torch.isfinite(g).all() and float((g - e).norm()) <= bound, f"{n}: gradient {what}"
    return lin


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("act", [nn.GELU, QuickGELU], ids=["gelu", "quickgelu"])
def test_open_clip_vit_matches_jvp(mode, act):
    model = getattr(small_vit(act).double(), mode)()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    check_model(model, x)


def test_open_clip_vit_with_frozen_parameters():
    model = small_vit().double()
    fo.attention_only(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lin = check_model(model, x)
    assert len(lin.names) == 4 and all("attn" in n for n in lin.names)


class ConvNet(nn.Module):
    def __init__(self, running_stats=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        # (torch.func.jvp, the reference, cannot update running statistics in train mode)
        self.bn = nn.BatchNorm2d(8, track_running_stats=running_stats)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.LayerNorm(32), nn.SiLU(),
                                  nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(),
                                  nn.Linear(16, 5))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.bn(self.conv2(self.norm(h))) + h
        h = F.avg_pool2d(h, 1)
        return self.head(h).softmax(-1) * 2.0 - 1.0 / (1.0 + h.mean())


@pytest.mark.parametrize("train", [True, False])
def test_mlp_and_cnn_match_jvp(train):
    torch.manual_seed(0)
    model = ConvNet(running_stats=not train).double().train(train)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    # GroupNorm has no dedicated dual function: it must take the jvp fallback, correctly
    lin, th0 = linearized_pair(model)
    with fallback_log() as fallbacks:
        lin.dual(x)
    assert any("group_norm" in f for f in fallbacks) and not any("batch_norm" in f for f in fallbacks)
    torch.manual_seed(0)
    model = ConvNet(running_stats=not train).double().train(train)
    check_model(model, x, expect_no_fallback=False)


def test_batch_norm_running_stats_update_once():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).double()
    plain = copy.deepcopy(bn)
    x = torch.randn(6, 4, dtype=torch.float64)
    fo.linearize(bn)(x)
    plain(x)
    assert torch.allclose(bn.running_mean, plain.running_mean) and torch.allclose(bn.running_var, plain.running_var)
    assert int(bn.num_batches_tracked) == 1


class OddOps(nn.Module):
    """Ops without a dual rule (erf, pow, clamp, max) and a module with its own parameter use."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, x):
        h = torch.erf(self.lin(x)) * self.scale
        return torch.clamp(h.pow(3), -0.5, 0.5) + h.max(dim=-1, keepdim=True).values


def test_unknown_ops_fall_back_to_jvp_correctly():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    with fallback_log() as fallbacks:
        check_model(OddOps().double(), x, expect_no_fallback=False)
    assert {"torch.erf", "torch.clamp"} <= fallbacks


class AttentionVariants(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        e = 16
        if mode == "separate-kv":
            self.mha = nn.MultiheadAttention(e, 4, kdim=8, vdim=12)
        else:
            self.mha = nn.MultiheadAttention(e, 4, batch_first=True, bias=mode != "no-bias")
        self.q = nn.Linear(e, e)
        self.k = nn.Linear(e, e)
        self.v = nn.Linear(e, e)

    def forward(self, x):
        b, t, e = x.shape
        if self.mode == "separate-kv":
            xs = x.transpose(0, 1)
            return self.mha(xs, xs[..., :8].contiguous(), torch.cat([xs, xs[..., :-4]], -1)[..., :12],
                            need_weights=False)[0].transpose(0, 1)
        if self.mode == "masks":
            pad = torch.zeros(b, t, dtype=torch.bool)
            pad[0, -2:] = True
            causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            return self.mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
        if self.mode == "need-weights":
            out, w = self.mha(x, x, x)
            return out + w.sum(-1, keepdim=True)
        if self.mode == "sdpa-causal":
            q, k, v = (m(x).view(b, t, 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, e)
        if self.mode == "sdpa-mask":
            q, k, v = (m(x).view(b, t, 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
            mask = torch.rand(t, t, generator=torch.Generator().manual_seed(0)) > 0.3
            mask.fill_diagonal_(True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2).reshape(b, t, e)
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize(
    "mode", ["plain", "no-bias", "separate-kv", "masks", "need-weights", "sdpa-causal", "sdpa-mask"]
)
@pytest.mark.parametrize("train", [True, False])
def test_attention_variants_match_jvp(mode, train):
    torch.manual_seed(0)
    model = AttentionVariants(mode).double().train(train)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    # need_weights returns the attention matrix: that configuration takes the (correct) fallback
    check_model(model, x, expect_no_fallback=mode != "need-weights")


def test_float32_and_autocast_run_close_to_float64():
    model = small_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    lin64, _ = linearized_pair(copy.deepcopy(model).double())
    lin32 = fo.linearize(copy.deepcopy(model))
    lin32.load_state_dict({k: v.float() for k, v in lin64.state_dict().items()})
    expected = lin64(x.double())
    assert rel_err(lin32(x), expected) <= TOL["ieee"]
    assert rel_err(lin32.tangent(x), lin64.tangent(x.double())) <= TOL["fp32-network"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin32(x)
    assert rel_err(out.float(), expected) <= 5e-2


def test_memory_linearized_step_keeps_only_primal_activations():
    """Bytes autograd saves for backward (parameters and th0 excluded): the linearized step
    stays within 1.10x of an ordinary step; torch.func.jvp keeps far more."""
    model = small_vit().train()
    x = torch.randn(8, 3, 32, 32)
    statics = list(model.parameters()) + list(model.buffers())
    ordinary = saved_activation_bytes(lambda: model(x).square().sum(), statics)
    lin = fo.linearize(model)
    statics += list(lin.buffers())
    ours = saved_activation_bytes(lambda: lin(x).square().sum(), statics)
    th0 = lin.base_values()

    def jvp_step():
        tau = {n: p - th0[n] for n, p in model.named_parameters()}
        primal, tangent = ref.jvp_linearized(model, th0, tau, x)
        return (primal + tangent).square().sum()
    reference = saved_activation_bytes(jvp_step, statics)
    assert ours <= 1.10 * ordinary, (ours, ordinary)  # issue 18: <= 1.10x (measured 1.05x)
    assert reference >= 1.5 * ordinary, (reference, ordinary)


def test_names_task_vector_and_optimizer():
    model = small_vit()
    names = [n for n, _ in model.named_parameters()]
    lin = fo.linearize(model)
    assert [n for n, _ in lin.named_parameters()] == [f"model.{n}" for n in names]
    assert list(lin.names) == names
    assert all(torch.count_nonzero(t) == 0 for t in lin.task_vector().values())
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    lin(x).square().sum().backward()
    opt.step()
    tv = lin.task_vector()
    assert set(tv) == set(names) and any(torch.count_nonzero(t) > 0 for t in tv.values())
    assert all(not t.requires_grad for t in tv.values())


def test_pass_reads_moved_and_reassigned_tensors():
    """The per-parameter slots are looked up once; the tensors in them are read every pass:
    a ``.double()`` of the whole model, and a parameter assigned anew, are both seen."""
    model = small_vit()
    lin = fo.linearize(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lin(x.float())  # the slots now exist
    lin.double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.proj.add_(0.01 * torch.randn(model.proj.shape, generator=gen, dtype=torch.float64))
    model.conv1.weight = nn.Parameter(model.conv1.weight.detach() + 0.01)
    primal, tangent = lin.dual(x)
    th0 = lin.base_values()
    tau = {n: p.detach() - th0[n] for n, p in model.named_parameters()}
    want_p, want_t = ref.jvp_linearized(model, th0, tau, x)
    assert primal.dtype == torch.float64
    assert rel_err(primal, want_p) <= F64_TOL and rel_err(tangent, want_t) <= F64_TOL
    assert float(tangent.detach().norm()) > 0


def test_dual_metadata_is_the_primals():
    from fastortho.dual import Dual

    primal, tangent = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    d = Dual(primal, tangent)
    assert (d.dtype, d.shape, d.device, d.ndim, d.dim(), d.size(1), d.numel(), len(d), d.stride()) == \
        (primal.dtype, primal.shape, primal.device, 3, 3, 4, 60, 3, primal.stride())
    assert d.is_floating_point() and not d.is_nested and d.is_contiguous()


def test_save_and_load_round_trip(tmp_path):
    model = small_vit()
    lin, _ = linearized_pair(model)
    path = tmp_path / "lin.safetensors"
    lin.save(path, metadata={"task": "MNIST"})
    other = fo.linearize(small_vit(seed=5))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(other(x), lin(x))
    other.load(path)
    assert torch.equal(other(x), lin(x))
    for (n, t), (_, u) in zip(lin.task_vector().items(), other.task_vector().items()):
        assert torch.equal(t, u), n
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastortho linearized-model file"):
        other.load(tmp_path / "other.safetensors")


def test_bad_inputs():
    with pytest.raises(TypeError, match="model"):
        fo.linearize("not a model")
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fo.linearize(frozen)
    lin = fo.linearize(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="inputs"):
        lin(torch.randn(2, 3, requires_grad=True))

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            h += 1
            return h
    with pytest.raises(NotImplementedError, match="in-place"):
        fo.linearize(InPlace())(torch.randn(2, 3))


def _ddp_worker(rank, world, path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    lin = fo.linearize(model)
    perturb(model)
    ddp = nn.parallel.DistributedDataParallel(lin)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    ddp(x[rank * 4:(rank + 1) * 4]).square().sum().backward()
    results[rank] = {n: p.grad.clone() * world for n, p in lin.named_parameters()}  # DDP averages
    dist.destroy_process_group()


def test_distributed_data_parallel(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    lin = fo.linearize(model)
    perturb(model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    lin(x).square().sum().backward()
    for n, p in lin.named_parameters():
        assert rel_err(results[0][n], p.grad) <= TOL["ieee"] and rel_err(results[1][n], p.grad) <= TOL["ieee"], n


def test_vit_b32_runs_with_default_attention_backend():
    """The full-size open_clip ViT-B-32 with nn.MultiheadAttention in eval mode (where the MHA
    fast path and the flash / efficient SDPA backends would break torch.func.jvp)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    lin = fo.linearize(model)
    perturb(model, 1e-3)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), fallback_log() as fallbacks:
        primal, tangent = lin.dual(x)
    assert not fallbacks
    ref_primal, ref_tangent = ref.jvp_linearized(model, lin.base_values(), lin.task_vector(), x)
    assert rel_err(primal, ref_primal) <= TOL["fp32-network"] and rel_err(tangent, ref_tangent) <= TOL["fp32-deep"]


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_linearized_step_compiles_fullgraph(kind):
    """torch.compile(fullgraph=True) traces the dual pass (the Dual subclass's torch-function
    rules included, nn.MultiheadAttention too) and gives eager's values and gradients."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
        x = torch.randn(5, 8)
    else:
        model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                                  output_dim=8)
        x = torch.randn(2, 3, 32, 32)
    lin = fo.linearize(model)
    perturb(model)
    eager = lin(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(lambda inp: lin(inp), fullgraph=True)(x)
    compiled.square().sum().backward()
    assert rel_err(compiled, eager) <= TOL["fp32-compiled"]
    for n, p in model.named_parameters():
        assert rel_err(p.grad, grads[n]) <= TOL["ieee"], n


def test_linearized_step_dispatches_at_most_twice_the_ops_of_an_ordinary_step():
    """The CPU proxy for a GPU step being host-bound (docs/design.md section 6): ATen ops of a
    linearized forward + backward, counted at the dispatcher, <= 2.0x an ordinary step's, on
    the block structure of an open_clip ViT (4 blocks)."""
    from open_clip.transformer import VisionTransformer

    from fastortho.testing import count_aten_ops

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0,
                              output_dim=16).train()
    x = torch.randn(2, 3, 32, 32)
    lin = fo.linearize(model)
    perturb(model)

    def ordinary():
        model(x).square().mean().backward()

    def linearized():
        lin(x).square().mean().backward()
    ordinary(), linearized()  # first calls build caches
    plain, ours = count_aten_ops(ordinary)["total"], count_aten_ops(linearized)["total"]
    assert ours <= 2.0 * plain, (ours, plain)


def test_attention_backward_reads_the_kept_output_instead_of_recomputing_it(monkeypatch):
    """nn.MultiheadAttention under linearize: the attention tangent's backward reads O through
    a view of the output projection's input (kept by that projection anyway) instead of
    computing P V again: one batched product fewer per block, the same gradients, no more
    bytes saved."""
    from fastortho.ops import dual
    from fastortho.testing import count_aten_ops

    model = small_vit().double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    lin, _ = linearized_pair(model)
    statics = list(model.parameters()) + list(model.buffers()) + list(lin.buffers())

    def grads_and_backward_bmms():
        lin.zero_grad(set_to_none=True)
        loss = lin(x).square().sum()
        bmms = count_aten_ops(loss.backward)["by_op"].get("bmm", 0)
        return [p.grad.clone() for p in lin.parameters() if p.requires_grad], bmms

    kept, kept_bmms = grads_and_backward_bmms()
    kept_bytes = saved_activation_bytes(lambda: lin(x).square().sum(), statics)
    apply = dual.AttentionTangent.apply
    monkeypatch.setattr(dual.AttentionTangent, "apply", lambda *a: apply(*a[:-1], False))
    recomputed, recomputed_bmms = grads_and_backward_bmms()
    assert kept_bmms == recomputed_bmms - len(model.transformer.resblocks), (kept_bmms, recomputed_bmms)
    assert all(rel_err(a, b) <= F64_TOL for a, b in zip(kept, recomputed))
    assert kept_bytes <= saved_activation_bytes(lambda: lin(x).square().sum(), statics)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
@pytest.mark.parametrize("keep_o", [False, True])
def test_attention_tangent_under_autocast_keeps_half_operands(keep_o, device):
    """Under bf16 autocast the attention tangent's products take bf16 operands with fp32
    accumulation (no fp32 copies of Q, K, V are saved) and stay within the bf16 tolerance of
    float64, forward and gradient."""
    from fastortho.ops.dual import AttentionTangent, attention_tangent

    gen = torch.Generator().manual_seed(3)
    N, H, L, D = 2, 3, 17, 8
    q, k, v, dq, dk, dv = (torch.randn(N, H, L, D, generator=gen) for _ in range(6))
    g = torch.randn(N, H, L, D, generator=gen)
    c = D ** -0.5
    o64 = torch.softmax(q.double() @ k.double().transpose(-1, -2) * c, -1) @ v.double()
    t64 = [t.double().requires_grad_(True) for t in (dq, dk, dv)]
    expected = attention_tangent(q.double(), k.double(), v.double(), o64, *t64, None, c)
    expected.backward(g.double())
    half = [t.to(device, torch.bfloat16) for t in (q, k, v)]
    tans = [t.to(device, torch.bfloat16).requires_grad_(True) for t in (dq, dk, dv)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = AttentionTangent.apply(*half, o64.to(device, torch.bfloat16), *tans, None, c, keep_o)
    out.backward(g.to(device, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert {t.dtype for t in saved if t.numel() >= N * H * L * D} == {torch.bfloat16}
    assert rel_err(out.cpu(), expected) <= TOL["bf16"]
    for got, want in zip(tans, t64):
        assert rel_err(got.grad.cpu(), want.grad) <= TOL["bf16"]
