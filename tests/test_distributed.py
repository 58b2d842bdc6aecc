"""Multi-process (gloo, 2 CPU processes): OrthoReg on DTensor / FSDP2-sharded weights, and
ortho_loss, linearized models and tau-Jp under DistributedDataParallel, each against the
single-process computation."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastortho as fo

from conftest import rel_err

WORLD = 2
# tall, wide, square, uneven across 2 ranks (7, 33 rows), a 1-row-per-rank case
SHAPES = [(7, 5), (5, 9), (8, 8), (33, 17), (2, 6), (17, 33)]


def weights_and_bases(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for r, c in SHAPES:
        b = torch.randn(r, c, generator=gen, dtype=torch.float64) * 0.1
        ws.append((b + torch.randn(r, c, generator=gen, dtype=torch.float64) / max(r, c) ** 0.5).float())
        bs.append(b.float())
    return ws, bs


class Layers(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(t.clone()) for t in tensors)


def _init(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)


def _count_sharded_calls():
    """Count the calls of the sharded path (so a test cannot pass through a fallback)."""
    from fastortho import distributed

    calls = []
    original = distributed.ShardedPenalty.apply

    def counting(*args):
        calls.append(args[5])  # the sharded dims
        return original(*args)
    distributed.ShardedPenalty.apply = counting
    return calls


def _dtensor_worker(rank, path, results, policy):
    _init(rank, path)
    from fastortho.distributed import set_exchange

    set_exchange(policy)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    ws, bs = weights_and_bases()
    # (7, 5) by columns and (5, 9) by rows exchange their blocks; the others their Grams
    placements = [Shard(1), Shard(0), Shard(1), Shard(0), Replicate(), Shard(1)]
    model = nn.Module()
    model.w = nn.ParameterList(nn.Parameter(distribute_tensor(w, mesh, [p])) for w, p in zip(ws, placements))
    calls = _count_sharded_calls()
    out = {}
    for squared in (True, False):
        for base_kind in ("full", "dtensor"):
            base = {f"w.{i}": b if base_kind == "full" else distribute_tensor(b, mesh, [p])
                    for i, (b, p) in enumerate(zip(bs, placements))}
            model.zero_grad(set_to_none=True)
            loss = fo.ortho_loss(model, base, squared=squared, precision="ieee")
            loss.backward()
            out[squared, base_kind] = (float(loss), [p.grad.full_tensor() for p in model.w])
    out["calls"] = list(calls)
    results[rank] = out
    dist.destroy_process_group()


def _spawn(worker, tmp_path, *extra):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), results, *extra), nprocs=WORLD, join=True)
    return dict(results)


@pytest.mark.parametrize("policy", ["auto", "gram"])
def test_dtensor_sharded_orthoreg_equals_single_process(tmp_path, policy):
    results = _spawn(_dtensor_worker, tmp_path, policy)
    assert results[0]["calls"] == [(1, 0, 1, 0, 1)] * 4  # the replicated weight took the plain path
    from fastortho.distributed import uses_gram_exchange
    kinds = [uses_gram_exchange(s, d, policy) for s, d in zip([SHAPES[i] for i in (0, 1, 2, 3, 5)], (1, 0, 1, 0, 1))]
    assert kinds == ([False, False, True, True, True] if policy == "auto" else [True] * 5)
    ws, bs = weights_and_bases()
    for squared in (True, False):
        model = Layers(ws)
        base = {f"w.{i}": b for i, b in enumerate(bs)}
        loss = fo.ortho_loss(model, base, squared=squared, precision="ieee")
        loss.backward()
        for rank in range(WORLD):
            for base_kind in ("full", "dtensor"):
                value, grads = results[rank][squared, base_kind]
                assert abs(value - float(loss)) <= 1e-5 * abs(float(loss)), (rank, squared, base_kind)
                for g, p in zip(grads, model.w):
                    assert rel_err(g, p.grad) <= 1e-5, (rank, squared, base_kind, tuple(p.shape))


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 12), nn.GELU(), nn.Linear(12, 3))


def tuned_net():
    """``tiny_net()`` moved away from its snapshot (full tensors, taken first): ``(model, base)``."""
    model = tiny_net()
    base = fo.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    return model, base


def batch():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def task_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _fsdp_worker(rank, path, results):
    _init(rank, path)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, base = tuned_net()  # the snapshot's full tensors are taken before sharding
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    x, y = batch()
    half = slice(rank * 4, (rank + 1) * 4)
    reg = fo.OrthoReg(model, base, lam=0.5)
    calls = _count_sharded_calls()
    loss = task_loss(model, x[half], y[half]) + reg()
    loss.backward()
    results[rank] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    results[rank] = dict(results[rank], calls=list(calls))
    dist.destroy_process_group()


def test_fsdp2_step_with_orthoreg_equals_single_process(tmp_path):
    results = _spawn(_fsdp_worker, tmp_path)
    assert results[0]["calls"] == [(0, 0, 0)]  # FSDP2 shards rows: one sharded call, 3 weights
    model, base = tuned_net()
    x, y = batch()
    (task_loss(model, x, y) + 0.5 * fo.ortho_loss(model, base)).backward()
    for rank in range(WORLD):
        for n, p in model.named_parameters():
            assert rel_err(results[rank][n], p.grad) <= 1e-5, (rank, n)


def _ddp_worker(rank, path, results):
    _init(rank, path)
    model, base = tuned_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = batch()
    half = slice(rank * 4, (rank + 1) * 4)
    (task_loss(ddp, x[half], y[half]) + 0.5 * fo.ortho_loss(model, base)).backward()
    out = {"orthoreg": {n: p.grad.clone() for n, p in model.named_parameters()}}

    # a linearized model trained with the strict tau-Jp penalty, through DDP
    lin_model = tiny_net()
    lin = fo.linearize(lin_model)
    with torch.no_grad():
        for p in lin_model.parameters():
            p.add_(0.05)
    ddp_lin = nn.parallel.DistributedDataParallel(lin)
    others = [torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + t)) for t in range(3)]
    reg = fo.TauJpRegularizer(ddp_lin, [o[rank * 2:(rank + 1) * 2] for o in others], mode="strict", lam=0.1)
    out_task, penalty = reg(x[half])
    (nn.functional.cross_entropy(out_task, y[half]) + penalty).backward()
    out["taujp"] = {n: p.grad.clone() for n, p in lin.named_parameters()}
    results[rank] = out
    dist.destroy_process_group()


def test_ddp_orthoreg_linearized_taujp_equal_single_process(tmp_path):
    results = _spawn(_ddp_worker, tmp_path)
    model, base = tuned_net()
    x, y = batch()
    (task_loss(model, x, y) + 0.5 * fo.ortho_loss(model, base)).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    lin_model = tiny_net()
    lin = fo.linearize(lin_model)
    with torch.no_grad():
        for p in lin_model.parameters():
            p.add_(0.05)
    others = [torch.randn(4, 6, generator=torch.Generator().manual_seed(10 + t)) for t in range(3)]
    # DDP averages over ranks: each rank's loss is its half's mean loss + 0.1 x its rows' penalty
    loss = nn.functional.cross_entropy(lin(x), y) + 0.1 * sum(fo.taujp_loss(lin, o) for o in others) / WORLD
    loss.backward()
    for rank in range(WORLD):
        for n, _ in model.named_parameters():
            assert rel_err(results[rank]["orthoreg"][n], expected[n]) <= 1e-5, (rank, n)
        for n, p in lin.named_parameters():
            assert rel_err(results[rank]["taujp"][n], p.grad) <= 1e-5, (rank, n)


def _ddp_accumulation_worker(rank, path, results):
    """Two micro-steps, the first under no_sync, with plain and bucket-view gradients: the
    OrthoReg gradient written straight into .grad (into_grad.py) must survive DDP's bucketing."""
    _init(rank, path)
    x, y = batch()
    half = slice(rank * 4, (rank + 1) * 4)
    out = {}
    for bucket_view in (False, True):
        model, base = tuned_net()
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        with ddp.no_sync():
            (task_loss(ddp, x[half], y[half]) + 0.5 * fo.ortho_loss(model, base)).backward()
        (task_loss(ddp, x[half], y[half]) + 0.5 * fo.ortho_loss(model, base)).backward()
        out[bucket_view] = {n: p.grad.clone() for n, p in model.named_parameters()}
    results[rank] = out
    dist.destroy_process_group()


def test_ddp_gradient_accumulation_with_orthoreg_equals_single_process(tmp_path):
    results = _spawn(_ddp_accumulation_worker, tmp_path)
    model, base = tuned_net()
    x, y = batch()
    for _ in range(2):
        (task_loss(model, x, y) + 0.5 * fo.ortho_loss(model, base)).backward()
    for rank in range(WORLD):
        for bucket_view in (False, True):
            for n, p in model.named_parameters():
                assert rel_err(results[rank][bucket_view][n], p.grad) <= 1e-5, (rank, bucket_view, n)


def test_communication_figures():
    from fastortho.distributed import communication_bytes
    from fastortho.testing import vit_weight_shapes

    shapes = vit_weight_shapes("ViT-L-14")
    figures = communication_bytes(shapes, world_size=8)
    assert figures["weight_bytes"] == 4 * sum(r * c for r, c in shapes)
    # per layer the cheaper exchange: never more than Grams alone or updates gathered twice
    assert figures["fastortho"] <= figures["gram_only"]
    assert figures["fastortho"] <= figures["gather_weights"]
    assert communication_bytes(shapes, world_size=8, policy="gram")["fastortho"] == figures["gram_only"]
    assert figures["gather_weights"] == int(2 * 7 / 8 * figures["weight_bytes"])


if os.name == "nt":  # pragma: no cover
    pytest.skip("gloo multi-process tests run on Linux", allow_module_level=True)


def torchrun(args, tmp_path, timeout, env=None):
    """``torchrun --standalone --nproc_per_node 2 <args>`` with each rank's output kept in
    its own log file; on a failure every rank's full log is shown (the first rank that dies
    is usually not the one whose error torchrun reports last)."""
    import subprocess
    import sys

    logs = tmp_path / "torchrun-logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", "--tee", "3", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    if proc.returncode != 0:
        ranks = "\n".join(f"===== {f.relative_to(logs)} =====\n{f.read_text(errors='replace')}"
                          for f in sorted(logs.rglob("*.log")))
        pytest.fail(f"torchrun exited with {proc.returncode}\n{ranks}\n===== torchrun's stderr =====\n{proc.stderr}")
    return proc


def test_ranks_building_the_offline_benchmark_at_once_share_its_cache(tmp_path):
    """Every rank of a torchrun job pretrains and caches the offline encoder when the cache is
    empty: concurrent writers must not collide (they once shared one fixed temporary name, and
    the loser's rename failed: the torchrun tests' rare 'Connection closed by peer')."""
    import json
    import subprocess
    import sys

    pytest.importorskip("open_clip")
    env = dict(os.environ, FASTORTHO_CACHE=str(tmp_path / "cache"))
    code = ("import json, sys\nfrom fastortho.offline import EncoderConfig, OfflineBenchmark\n"
            "b = OfflineBenchmark(EncoderConfig(**json.loads(sys.argv[1])), progress=False)\n"
            "print(sum(float(v.double().sum()) for v in b._encoder_state.values()))\n")
    tiny = json.dumps({"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "pretrain_steps": 30})
    procs = [subprocess.Popen([sys.executable, "-c", code, tiny], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1  # the same encoder everywhere
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [f.name for f in (tmp_path / "cache").glob("offline-*")]


@pytest.mark.parametrize(
    "flags",
    [["--parallel", "fsdp", "--reg", "orthoreg"], ["--parallel", "ddp", "--reg", "taujp"]],
    ids=["fsdp-orthoreg", "ddp-taujp"],
)
def test_torchrun_example(flags, tmp_path):
    """examples/distributed_finetune.py under torchrun, 2 CPU processes (the README command)."""
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "distributed_finetune.py"
    proc = torchrun([str(script), "--tiny", "--steps", "2", *flags], tmp_path, timeout=120)
    assert "step 1: loss" in proc.stdout + proc.stderr


@pytest.mark.parametrize("mode,reg", [("nonlinear", "orthoreg"), ("linear", "taujp-strict")])
def test_finetune_script_under_torchrun(mode, reg, tmp_path):
    """fastortho-finetune (python -m fastortho.cli finetune) launched by torchrun, 2 CPU
    processes: DDP, rank 0 writes the task vector."""
    import json

    pytest.importorskip("sklearn")
    env = dict(os.environ, FASTORTHO_CACHE=str(tmp_path / "cache"),
               FASTORTHO_OFFLINE_CONFIG=json.dumps({"width": 32, "layers": 1, "heads": 2, "output_dim": 16,
                                                    "pretrain_steps": 5}))
    torchrun(["-m", "fastortho.cli", "finetune", "--tasks", "Shapes", "--mode", mode, "--reg", reg, "--steps", "2",
              "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--taujp-batch", "4", "--out",
              str(tmp_path / "runs"), "--no-progress"], tmp_path, timeout=180, env=env)
    tv = fo.TaskVector.load(tmp_path / "runs" / f"{mode}-{reg}" / "Shapes.safetensors")
    assert tv.metadata["mode"] == mode and tv.norm() > 0
