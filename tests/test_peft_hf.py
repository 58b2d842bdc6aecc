"""The real libraries (issue 19): Hugging Face PEFT adapters on open_clip's
nn.MultiheadAttention and on transformers' CLIP q/k/v/out projections, DoRA refused, and
transformers' CLIPVisionModel (sdpa and eager attention) under ortho_loss and linearize,
each against the libraries' own computation."""
import copy

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import reference as ref

from conftest import TOL

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def small_open_clip_vit():
    from fastortho.offline import EncoderConfig, build_encoder

    return build_encoder(EncoderConfig(width=32, layers=2, heads=2, output_dim=16)).double()


def small_hf_clip_vision(attn: str):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                                        attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(cfg).double().eval()


def dense_deltas_by_merging(peft_model, base_model):
    """merge_and_unload's weights minus the base's: PEFT's own account of the update."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    base = dict(base_model.named_parameters())
    return {k: (v - base[k]).detach() for k, v in merged.named_parameters()
            if k in base and not torch.equal(v, base[k])}


def nonzero_lora(peft_model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def test_peft_lora_on_multihead_attention_names_the_real_weights():
    base = small_open_clip_vit()
    model = nonzero_lora(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                  target_modules=["attn"])))
    deltas = fo.lora_delta_weights(model)
    assert sorted(deltas) == sorted(f"transformer.resblocks.{i}.attn.{w}" for i in range(2)
                                    for w in ("in_proj_weight", "out_proj.weight"))
    expected = dense_deltas_by_merging(model, base)
    assert sorted(expected) == sorted(deltas)
    for k in deltas:
        assert torch.allclose(deltas[k], expected[k], atol=1e-12), k
    tv = fo.TaskVector.from_lora(model)
    merged = tv.apply_to(base)  # failed on the wrong names
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-10)
    # the penalty of each adapter is the penalty of its dense update
    values = [ref.layer_penalty(ad.scale * (ad.B.double() @ ad.A.double()), True) for ad in fo.lora_adapters(model)]
    assert torch.allclose(fo.ortho_loss(model).double(), torch.stack(values).sum(), rtol=1e-5)


def test_peft_dora_is_refused_clearly():
    model = peft.get_peft_model(small_open_clip_vit(), peft.LoraConfig(r=4, target_modules=["c_fc"], use_dora=True))
    with pytest.raises(NotImplementedError, match=r"is DoRA \(use_dora=True\)"):
        fo.lora_delta_weights(model)
    with pytest.raises(NotImplementedError, match="DoRA"):
        fo.ortho_loss(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_peft_on_hf_clip_projections(attn):
    base = small_hf_clip_vision(attn)
    model = nonzero_lora(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])))
    deltas = fo.lora_delta_weights(model)
    params = dict(base.named_parameters())
    assert len(deltas) == 8 and all(k in params and k.endswith("_proj.weight") for k in deltas)  # the model's names
    expected = dense_deltas_by_merging(model, base)
    assert sorted(expected) == sorted(deltas)
    for k in deltas:
        assert torch.allclose(deltas[k], expected[k], atol=1e-12), k
    values = [ref.layer_penalty(ad.scale * (ad.B.double() @ ad.A.double()), True) for ad in fo.lora_adapters(model)]
    assert torch.allclose(fo.ortho_loss(model).double(), torch.stack(values).sum(), rtol=1e-5)


class Pooled(nn.Module):
    """transformers' vision model, returning the pooled features (one tensor)."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values):
        return self.vision(pixel_values=pixel_values).pooler_output


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_clip_vision_linearized_matches_jvp_and_orthoreg_matches_reference(attn):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = Pooled(small_hf_clip_vision(attn))
    base = fo.snapshot(model)
    lin = fo.linearize(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, tangent = lin(x, return_tangent=True)
    names, th0, tau = lin.names, lin.base_values(), lin.task_vector()
    with sdpa_kernel(SDPBackend.MATH):
        _, expected = torch.func.jvp(lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
                                     tuple(th0[n] for n in names), tuple(tau[n] for n in names))
    # eager attention computes its softmax in fp32 even for float64 inputs (transformers'
    # dtype=torch.float32): the two tangents then agree to fp32's precision, not float64's
    bound = TOL["float64"] if attn == "sdpa" else TOL["fp32-network"]
    assert float((tangent - expected).norm() / expected.norm()) < bound
    value = fo.ortho_loss(model, base, backend="torch")
    expected_value = sum(ref.layer_penalty(p.detach() - base[n], True) for n, p in fo.select_parameters(model))
    assert torch.allclose(value.double(), expected_value, rtol=1e-5)
