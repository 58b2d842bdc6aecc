"""Fine-tune an open_clip ViT (random init; a few steps on random data) with OrthoReg or
tau-Jp across processes, launched by torchrun:

    torchrun --nproc_per_node 8 examples/distributed_finetune.py --model ViT-L-14 --parallel fsdp --reg orthoreg
    torchrun --nproc_per_node 8 examples/distributed_finetune.py --model ViT-B-32 --parallel ddp --reg taujp
    torchrun --nproc_per_node 2 examples/distributed_finetune.py --tiny --steps 2     # CPU, gloo

``--parallel ddp`` wraps the model (or its linearization, for tau-Jp) in
DistributedDataParallel; ``--parallel fsdp`` shards every block and the model with FSDP2's
``fully_shard``, and OrthoReg then runs on the shards (``fastortho.distributed``).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import fastortho as fo


def build(args, device):
    import open_clip

    if args.tiny:
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
                                 output_dim=16).to(device)
    return open_clip.create_model(args.model, pretrained=None).visual.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 32-pixel ViT (CPU smoke runs)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--reg", choices=["orthoreg", "taujp"], default="orthoreg")
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build(args, device)
    size = 32 if args.tiny else 224
    if args.reg == "taujp" and args.parallel == "fsdp":
        parser.error("--reg taujp runs with --parallel ddp (the linearized model is replicated)")

    if args.reg == "orthoreg":
        base = fo.snapshot(model)  # full pretrained weights; sliced per rank when sharded
        if args.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for block in model.transformer.resblocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            net = model
        else:
            net = nn.parallel.DistributedDataParallel(model)
        reg = fo.OrthoReg(model, base, lam=args.lam)
        params = model.parameters()
    else:
        lin = fo.linearize(model)
        net = nn.parallel.DistributedDataParallel(lin)
        gen = torch.Generator().manual_seed(100 + rank)
        others = [torch.randn(2, 3, size, size, generator=gen).to(device) for _ in range(3)]
        reg = fo.TauJpRegularizer(net, others, mode="cyclical", lam=args.lam)
        params = lin.parameters()

    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(rank)
    for step in tqdm(range(args.steps), desc=f"rank {rank}", disable=rank != 0):
        x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
        if args.reg == "orthoreg":
            out = net(x)
            penalty = reg()
        else:
            out, penalty = reg(x)  # one dual pass through DDP: task batch + another task's batch
        loss = out.float().square().mean() + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            tqdm.write(f"step {step}: loss {float(loss.detach()):.4f} penalty {float(penalty.detach()):.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
