"""Training state survives kills, races and damage (issue 20, items 1-3, 5-7): every write of
a checkpoint killed with SIGKILL (tests/crash_driver.py), a second run on one folder, a
damaged newest checkpoint, an unwritable folder, a resume from other base weights, and an
exact tau-Jp resume."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastortho as fo
from fastortho import _files
from fastortho.offline import EncoderConfig, OfflineBenchmark
from fastortho.train import FinetuneConfig, finetune
from fastortho.train import checkpoint as checkpoints

pytest.importorskip("open_clip")

TINY = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "pretrain_steps": 10}
CFG = dict(steps=4, batch_size=8, lr=1e-3, warmup=1, checkpoint_every=2, taujp_batch=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    os.environ["FASTORTHO_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="module")
def bench(cache):
    return OfflineBenchmark(EncoderConfig(**TINY), progress=False)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault-injection driver forks")
def test_a_kill_at_any_write_of_a_checkpoint_loses_nothing(bench, cache, tmp_path):
    env = {**os.environ, "FASTORTHO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    driver = Path(__file__).with_name("crash_driver.py")
    proc = subprocess.run([sys.executable, str(driver), str(tmp_path), "nonlinear", "none"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    # 3 checkpoints x (model, train state, config, manifest, publish) + dropping the oldest
    assert report["points"] == 16 and report["kinds"].count("publish") == 3 and "discard" in report["kinds"]
    assert len(report["runs"]) == 32
    for run in report["runs"]:
        where = f"killed {run['how']} write point {run['index']} ({run['kind']})"
        assert run["killed"], where
        assert run["resume_status"] == 0, where
        assert run["steps"] == run["expected_steps"], where  # resumed from the last checkpoint published
        assert run["bit_exact"], where  # the uninterrupted run's task vector, to the bit
        assert run["warnings"] == [], where
        assert run["leftovers"] == ["step-00000002", "step-00000003"], where  # nothing half-written left


def test_a_second_run_on_one_folder_refuses_and_names_the_holder(bench, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fastortho._files import RunLock\n"
                               "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
                               str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fo.RunLockedError, match=rf"in use by another run \(pid {holder.pid} on "):
            finetune(bench, "Digits", FinetuneConfig(**CFG), checkpoint_dir=tmp_path / "ckpt", progress=False)
    finally:
        holder.kill()
        holder.wait()
    # a killed holder leaves no stale lock
    res = finetune(bench, "Digits", FinetuneConfig(**CFG), checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert res.steps == CFG["steps"]


def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(bench, tmp_path):
    cfg = FinetuneConfig(**{**CFG, "steps": 6})
    full = finetune(bench, "Digits", cfg, progress=False).task_vector
    finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, progress=False)
    assert [s for s, _ in checkpoints.step_dirs(tmp_path)] == [6, 4]
    model = tmp_path / "step-00000006" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight
    model.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-00000006 is damaged .*model.safetensors does not match its checksum"):
        resumed = finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.steps == 2  # from step 4
    for k in full:
        assert torch.equal(full[k], resumed.task_vector[k]), k


@pytest.mark.parametrize("bad", ["a file", "under /proc"])
def test_an_unwritable_checkpoint_folder_is_found_before_the_first_step(bench, tmp_path, bad):
    if bad == "a file":
        target = tmp_path / "taken"
        target.write_text("x")
    else:
        target = Path("/proc/fastortho-test-run")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="checkpoint_dir: "):
        finetune(bench, "Digits", FinetuneConfig(**{**CFG, "steps": 2000}), checkpoint_dir=target, progress=False)
    assert time.perf_counter() - t0 < 5  # refused up front, not after 2000 steps


def test_resume_refuses_other_base_weights_and_no_resume_starts_over(bench, tmp_path, monkeypatch):
    cfg = FinetuneConfig(**CFG)
    finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, progress=False)
    original = bench.encoder

    def other_weights():
        enc = original()
        with torch.no_grad():
            next(iter(enc.parameters())).add_(1e-3)  # same architecture, other weights
        return enc
    monkeypatch.setattr(bench, "encoder", other_weights)
    with pytest.raises(ValueError, match=r"fine-tuned from other pretrained weights: offline \(sha256 [0-9a-f]{12}\) "
                                         r"then, offline \(sha256 [0-9a-f]{12}\) now"):
        finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, progress=False)
    res = finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert res.steps == CFG["steps"]  # started over; the old run's checkpoints are gone
    again = finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.steps == 0


def test_an_earlier_layout_or_a_changed_configuration_says_what_to_do(bench, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="earlier fastortho without a manifest.*--no-resume"):
        finetune(bench, "Digits", FinetuneConfig(**CFG), checkpoint_dir=tmp_path / "old", progress=False)
    finetune(bench, "Digits", FinetuneConfig(**CFG), checkpoint_dir=tmp_path / "new", progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.001 in the checkpoint, 0.0005 now\); rerun with the checkpoint's "
                                         r"options to resume it, or with --no-resume"):
        finetune(bench, "Digits", FinetuneConfig(**{**CFG, "lr": 5e-4}), checkpoint_dir=tmp_path / "new",
                 progress=False)


@pytest.mark.parametrize("mode,reg", [("nonlinear", "none"), ("linear", "taujp-cyclical"), ("linear", "taujp-strict")])
def test_resume_after_an_interruption_is_exact(bench, tmp_path, mode, reg):
    """Stopped right after the step-2 checkpoint, resumed: the uninterrupted run's vector, the
    tau-Jp regularizer's step and streams included."""
    cfg = FinetuneConfig(**{**CFG, "mode": mode, "reg": reg})
    full = finetune(bench, "Textures", cfg, progress=False).task_vector

    class Stop(Exception):
        """The simulated crash right after the step-2 checkpoint."""
    original = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        if args[4] == 2:
            raise Stop
    checkpoints.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            finetune(bench, "Textures", cfg, checkpoint_dir=tmp_path, progress=False)
    finally:
        checkpoints.save_checkpoint = original
    extra = torch.load(tmp_path / "step-00000002" / "train_state.pt", weights_only=True)["extra"]
    if reg != "none":
        saved = extra["taujp"]
        assert saved["calls"] == 2 and saved["drawn"] == ([1, 1, 0] if reg == "taujp-cyclical" else [2, 2, 2])
    resumed = finetune(bench, "Textures", cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.steps == 2
    for k in full:
        assert torch.equal(full[k], resumed.task_vector[k]), k


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    _files.write_text(target, "old")

    class Boom(Exception):
        """A writer failing mid-file."""
    with pytest.raises(Boom):
        with _files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    a, b = _files.temporary_name(target), _files.temporary_name(target)
    assert a != b and a.parent == target.parent and str(os.getpid()) in a.name  # unique per writer
