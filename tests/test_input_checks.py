"""Bad values, damaged files and hostile inputs get an error naming what is wrong (issue 20,
items 4, 5, 9-14; issue 21, item 2), never a silent result."""
import json
import math
import os

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import _files
from fastortho.commands import ablate
from fastortho.commands import eval as eval_command
from fastortho.commands import finetune as finetune_command
from fastortho.train import FinetuneConfig

TINY = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "pretrain_steps": 10}


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


# ----------------------------------------------------------------------------- values (item 10, 14)

@pytest.mark.parametrize("field,value,message", [
    ("lr", math.inf, "lr: expected a finite number"), ("lr", 0.0, "lr: expected a number > 0"),
    ("lam", -1.0, "lam: expected a number >= 0"), ("lam", math.nan, "lam: expected a finite number, got nan"),
    ("checkpoint_every", -1, "checkpoint_every: expected an integer >= 0"),
    ("weight_decay", math.nan, "weight_decay: expected a finite number"), ("steps", 1.5, "steps: expected an integer"),
    ("lora_alpha", 0.0, "lora_alpha: expected a number > 0"), ("warmup", -2, "warmup: expected an integer >= 0"),
])
def test_a_bad_configuration_value_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**{field: value}).check()


def test_library_arguments_are_checked():
    model = small_model()
    base = fo.snapshot(model)
    with pytest.raises(TypeError, match="squared: expected True or False, got 'False'"):
        fo.ortho_loss(model, base, squared="False")
    with pytest.raises(TypeError, match="squared"):
        fo.OrthoReg(model, base, squared=0)
    with pytest.raises(ValueError, match="lam: expected a finite number, got nan"):
        fo.OrthoReg(model, base, lam=float("nan"))
    with pytest.raises(ValueError, match="lam: expected a number >= 0"):
        fo.OrthoReg(model, base, lam=-0.5)
    tv = fo.TaskVector({"0.weight": torch.ones(5, 6)})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scalar: expected a finite number"):
            tv * bad
        with pytest.raises(ValueError, match="alpha: expected a finite number"):
            tv.apply_to(model, alpha=bad)
    with pytest.raises(ValueError, match="scalar: expected a finite number"):
        tv * float("-inf")
    assert torch.equal((tv * 2.0)["0.weight"], torch.full((5, 6), 2.0))  # finite values still work


def test_meta_device_models_are_refused_by_name():
    model = small_model().to("meta")  # (conftest's allocation wrappers bypass a torch.device("meta") block)
    with pytest.raises(ValueError, match="model: 2 tensor.*meta device.*'0.weight'"):
        fo.ortho_loss(model, fo.snapshot(model))
    with pytest.raises(ValueError, match="meta device"):
        fo.OrthoReg(model, fo.snapshot(model))
    with pytest.raises(ValueError, match="vector: .*meta device"):
        fo.TaskVector.from_models(model, model)


def test_a_replaced_submodule_of_a_linearized_model_raises():
    model = small_model()
    lin = fo.linearize(model)
    lin(torch.randn(2, 6))
    model[2] = nn.Linear(5, 3)
    with pytest.raises(RuntimeError, match="submodule '2' was replaced"):
        lin(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="submodule '2' was replaced"):
        lin.task_vector()
    fresh = fo.linearize(model)  # linearizing again is the way on
    assert set(fresh.task_vector()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ----------------------------------------------------------------------------- files (items 11, 12, 14)

def test_linearized_model_load_validates_before_copying(tmp_path):
    lin = fo.linearize(small_model())
    other = fo.linearize(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4)))  # another head
    other.save(tmp_path / "other.safetensors")
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(ValueError, match="another architecture.*nothing was loaded"):
        lin.load(tmp_path / "other.safetensors")
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())  # not a partial load
    lin.save(tmp_path / "same.safetensors")
    lin.load(tmp_path / "same.safetensors")


def test_damaged_files_are_named(tmp_path):
    tv = fo.TaskVector({"a": torch.randn(4, 4), "b": torch.randn(3)}, {"task": "X"})
    path = tmp_path / "X.safetensors"
    tv.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        fo.TaskVector.load(tmp_path / "cut.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors file"):
        fo.TaskVector.load(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tv.items()}, str(tmp_path / "meta.safetensors"),
              metadata={"format": "fastortho.TaskVector", "tensor_order": "[not json"})
    with pytest.raises(ValueError, match="'tensor_order' of .*meta.safetensors is not valid JSON"):
        fo.TaskVector.load(tmp_path / "meta.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt is empty"):
        fo.task_vectors.load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch checkpoint"):
        fo.task_vectors.load_checkpoint(tmp_path / "junk.pt")


def test_every_output_is_written_atomically(tmp_path, monkeypatch):
    """A writer that dies mid-file leaves the previous file whole (and no temporary behind)."""
    tv = fo.TaskVector({"a": torch.randn(4, 4)})
    lin = fo.linearize(small_model())
    snap = fo.snapshot(small_model())
    writers = {"vector.safetensors": tv.save, "lin.safetensors": lin.save, "snap.safetensors": snap.save}
    for name, save in writers.items():
        save(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in writers}
    import safetensors.torch

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"{half")
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    for name, save in writers.items():
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path / name)
        assert (tmp_path / name).read_bytes() == before[name], name
    assert sorted(os.listdir(tmp_path)) == sorted(writers)


def test_a_damaged_encoder_cache_is_regenerated(tmp_path, monkeypatch):
    from fastortho.offline import EncoderConfig, OfflineBenchmark

    monkeypatch.setenv("FASTORTHO_CACHE", str(tmp_path))
    first = OfflineBenchmark(EncoderConfig(**TINY), progress=False)
    (cache,) = tmp_path.glob("offline-encoder-*.safetensors")
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="offline encoder cache: .* is regenerated"):
        again = OfflineBenchmark(EncoderConfig(**TINY), progress=False)
    assert all(torch.equal(first._encoder_state[k], again._encoder_state[k]) for k in first._encoder_state)
    _files.read_safetensors(cache)  # whole again


def test_mha_options_under_linearize():
    class Attention(nn.Module):
        def __init__(self, need_weights, **kw):
            super().__init__()
            self.mha, self.need_weights = nn.MultiheadAttention(8, 2, batch_first=True, **kw), need_weights

        def forward(self, x):
            return self.mha(x, x, x, need_weights=self.need_weights)[0]
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"MultiheadAttention\(dropout > 0\) in train mode"):
        fo.linearize(Attention(False, dropout=0.1).double().train())(x)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for kw in ({"add_bias_kv": True}, {"add_zero_attn": True}):
        model = Attention(False, **kw).double()
        lin = fo.linearize(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        _, tangent = lin(x, return_tangent=True)
        names, base, tau = lin.names, lin.base_values(), lin.task_vector()
        with sdpa_kernel(SDPBackend.MATH):
            _, expected = torch.func.jvp(lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),  # noqa: B023
                                         tuple(base[n] for n in names), tuple(tau[n] for n in names))
        assert float((tangent - expected).norm() / expected.norm()) < 1e-10, kw


# ----------------------------------------------------------------------------- commands (items 4, 9; issue 21 item 2)

@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTORTHO_OFFLINE_CONFIG", json.dumps(TINY))
    monkeypatch.setenv("FASTORTHO_CACHE", str(tmp_path / "cache"))
    return ["--steps", "2", "--batch-size", "8", "--no-progress", "--lr", "1e-3", "--warmup", "1"]


def test_eval_refuses_mixed_nan_and_misnamed_vectors(offline, tmp_path, capsys):
    finetune_command.main(["--out", str(tmp_path / "runs"), *offline])
    folder = tmp_path / "runs" / "nonlinear-none"
    vectors = {t: fo.TaskVector.load(folder / f"{t}.safetensors") for t in ["Digits", "Textures"]}

    def expect(problem):
        with pytest.raises(SystemExit) as e:
            eval_command.main(["--vectors", str(folder), "--out", str(tmp_path / "eval"), "--no-progress"])
        assert e.value.code == 2
        assert problem in capsys.readouterr().err
    original = folder / "Digits.safetensors"
    fo.TaskVector(vectors["Digits"], {**vectors["Digits"].metadata, "mode": "linear"}).save(original)
    expect("different fine-tuning modes (Digits.safetensors: linear, Textures.safetensors: nonlinear")
    nan = {k: v.clone() for k, v in vectors["Digits"].items()}
    next(iter(nan.values())).view(-1)[0] = float("nan")
    fo.TaskVector(nan, vectors["Digits"].metadata).save(original)
    expect("Digits.safetensors has NaN or infinite entries")
    vectors["Textures"].save(original)  # the Textures vector under Digits' name
    expect("holds the task vector of 'Textures' (its metadata), not of 'Digits'")


def test_user_errors_are_one_line_with_exit_status_2(offline, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(SystemExit) as e:
        finetune_command.main(["--out", str(target), *offline])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (
        err.startswith("fastortho-finetune: error: --out: cannot write in ")
        and "a-file" in err
        and "Not a directory" in err
    )
    with pytest.raises(SystemExit) as e:
        finetune_command.main(["--out", str(tmp_path / "o"), "--lam", "nan", *offline])
    assert e.value.code == 2 and "lam: expected a finite number, got nan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lam: expected a finite number"):  # --debug: the exception itself
        finetune_command.main(["--out", str(tmp_path / "o"), "--lam", "nan", "--debug", *offline])


def test_clip8_reports_every_input_problem_at_once(tmp_path, capsys):
    pytest.importorskip("open_clip")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        finetune_command.main(["--benchmark", "clip8", "--weights", str(tmp_path / "empty.pt"), "--data-root",
                               str(tmp_path), "--tasks", "DTD,MNIST", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--weights: " in err and "empty.pt is empty" in err  # the weights AND every dataset, one run
    assert "dataset 'DTD' (train)" in err and "dataset 'MNIST' (test)" in err and "Expected layout" in err


def test_ablate_tolerates_a_torn_record_and_can_start_over(offline, tmp_path, capsys):
    args = ["--modes", "nonlinear", "--regs", "none", "--out", str(tmp_path / "abl"), *offline]
    ablate.main(args)
    records = tmp_path / "abl" / "runs.jsonl"
    good = records.read_text()
    records.write_text(good + '{"mode": "linear", "reg": "no')  # a record torn by a kill
    capsys.readouterr()
    ablate.main(args)
    out = capsys.readouterr()
    assert "runs.jsonl line 2 is damaged" in out.err and "done before, skipped" in out.out
    assert records.read_text() == good  # rewritten whole, without the torn tail
    assert "checkpoints included" in out.out and "--overwrite starts over" in out.out
    ablate.main([*args, "--overwrite"])
    assert "done before, skipped" not in capsys.readouterr().out


def test_a_second_ablate_on_one_out_refuses(offline, tmp_path, capsys):
    with _files.RunLock(tmp_path / "abl"):
        with pytest.raises(SystemExit) as e:
            ablate.main(["--modes", "nonlinear", "--regs", "none", "--out", str(tmp_path / "abl"), *offline])
    assert e.value.code == 2 and f"in use by another run (pid {os.getpid()} on" in capsys.readouterr().err


def test_a_diverged_run_is_refused_not_saved(offline, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune_command.main(["--out", str(tmp_path / "runs"), *offline[:-4], "--lr", "1e30", "--warmup", "0",
                               "--tasks", "Digits"])
    assert e.value.code == 2 and "fine-tuning Digits diverged" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "nonlinear-none" / "Digits.safetensors").exists()


def test_lambda_grid_values_are_checked():
    from fastortho.commands.ablate import lambda_grid

    assert lambda_grid("0.1,1,10,100", 0.5) == [0.1, 1.0, 10.0, 100.0] and lambda_grid(None, 0.5) == [0.5]
    for bad in ("0.1,x", "1,-1", "1,nan", "1,1"):
        with pytest.raises(ValueError, match="--lam-grid"):
            lambda_grid(bad, 0.1)
