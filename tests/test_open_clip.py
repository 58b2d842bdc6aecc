"""OrthoReg on real open_clip vision towers (random init, pretrained=None: nothing downloaded)."""
import pytest
import torch

import fastortho as fo
from fastortho import reference as ref
from fastortho.testing import vit_weight_shapes

from conftest import TOL, rel_err

open_clip = pytest.importorskip("open_clip")


def visual_tower(name, device="cpu"):
    if device == "meta":
        with torch.device("meta"):
            return open_clip.create_model(name, pretrained=None, device="meta").visual
    return open_clip.create_model(name, pretrained=None).visual


@pytest.mark.parametrize("name, count", [("ViT-B-32", 50), ("ViT-B-16", 50), ("ViT-L-14", 98)])
def test_released_rule_selects_every_2d_weight(name, count):
    model = visual_tower(name, "meta")
    selected = fo.select_parameters(model)
    assert len(selected) == count
    assert [tuple(p.shape) for _, p in selected] == vit_weight_shapes(name)
    layers = count // 4 if count == 98 else 12
    attention = [n for n, _ in fo.select_parameters(model, "attention")]
    assert len(attention) == 2 * layers
    assert all(n.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for n in attention)
    assert len(fo.select_parameters(model, "linear")) == 4 * layers


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    model = visual_tower("ViT-B-32")
    base = fo.snapshot(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base:
                # half the scale that puts G at I: keeps G - I of order 1 (cf. test_orthoreg.py)
                p.add_(0.5 * torch.randn_like(p) / max(p.shape) ** 0.5)
    return model, base


@pytest.mark.parametrize("squared", [True, False])
def test_vit_b32_penalty_and_gradient_match_reference(vit_b32, squared):
    model, base = vit_b32
    model.zero_grad(set_to_none=True)
    loss = fo.ortho_loss(model, base, squared=squared, precision="ieee")
    loss.backward()
    params = dict(model.named_parameters())
    deltas = {n: params[n].detach().double() - base[n].double() for n in base}
    with torch.no_grad():
        expected = sum(ref.layer_penalty(d, squared) for d in deltas.values())
    assert rel_err(loss, expected) <= TOL["ieee"]
    for name in ("positional_embedding", "proj", "transformer.resblocks.5.attn.in_proj_weight",
                 "transformer.resblocks.11.mlp.c_proj.weight"):
        assert rel_err(params[name].grad, ref.layer_penalty_grad(deltas[name], squared)) <= TOL["ieee"], name
    assert all(params[n].grad is not None for n in base)
    assert params["conv1.weight"].grad is None and params["class_embedding"].grad is None
