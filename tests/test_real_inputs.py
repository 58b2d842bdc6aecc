"""Real inputs (issue 19): merging a deep copy of a LoRA model leaves the original working,
tied weights are one entry of a task vector."""
import copy

import pytest
import torch
from torch import nn

import fastortho as fo


def test_merging_a_copy_leaves_the_original_working():
    pytest.importorskip("open_clip")
    from fastortho.offline import EncoderConfig, build_encoder

    model = fo.add_lora(build_encoder(EncoderConfig(width=32, layers=1, heads=2, output_dim=16)), targets="qkvo",
                        rank=4, alpha=4)
    with torch.no_grad():
        for a in fo.lora_adapters(model):
            a.B.normal_(0, 0.1)  # a non-zero update
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    merged = fo.merge_lora(copy.deepcopy(model))
    assert torch.allclose(merged(x), before, atol=1e-5)
    assert torch.equal(model(x), before) and len(fo.lora_adapters(model)) == 4  # once an AttributeError
    fo.merge_lora(model)
    assert torch.allclose(model(x), before, atol=1e-5)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = self.encoder  # one module under two names: two state_dict keys, one tensor

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_tied_weights_are_one_entry_of_a_task_vector(tmp_path):
    pre = Tied()
    fine = copy.deepcopy(pre)
    with torch.no_grad():
        fine.encoder.weight.add_(1.0)
    tv = fo.TaskVector.from_models(pre, fine)
    assert list(tv) == ["encoder.weight", "encoder.bias"]
    assert tv.norm() == pytest.approx(4.0)  # 16 entries of 1, counted once
    merged = tv.apply_to(pre)
    assert torch.allclose(merged.encoder.weight, pre.encoder.weight + 1)  # once added twice: + 2
    state = tv.apply_to(pre.state_dict())
    assert torch.allclose(state["decoder.weight"], pre.encoder.weight + 1)
    tv.save(tmp_path / "tv.safetensors")
    again = fo.TaskVector.load(tmp_path / "tv.safetensors")
    assert torch.allclose(again.apply_to(pre.state_dict())["decoder.weight"], pre.encoder.weight + 1)
    plain = fo.TaskVector.from_models(pre.state_dict(), fine)  # a clone of the state (no aliases) on one side
    assert list(plain) == ["encoder.weight", "encoder.bias"]
