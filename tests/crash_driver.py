"""Fault injection for tests/test_crash_safety.py (run as a script in its own process).

A fine-tuning run with a checkpoint every step is killed with SIGKILL at every write point
of its checkpoints (fastortho._files.write_file, publish, discard), once just before the
write and once after tearing it (half a file written, a directory renamed but not yet
deleted). After each kill a fresh process resumes the run. Every resumed run must start
from the last checkpoint published before the kill and end with exactly the task vector of
an uninterrupted run.

Each run is a child forked from this process (fast, and with one CPU thread everywhere so
that results are bit-exact across processes). Writes ``report.json`` in the given folder.
"""
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any op: no OpenMP pool exists when the children fork

from fastortho import _files  # noqa: E402
from fastortho.offline import EncoderConfig, OfflineBenchmark  # noqa: E402
from fastortho.train import FinetuneConfig, finetune  # noqa: E402

TINY = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "pretrain_steps": 10}
POINTS = ("write_file", "publish", "discard")


def in_child(fn) -> int:
    """Run ``fn`` in a forked child; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def instrument(on_point):
    """Route every write primitive through ``on_point(index, kind, real, args)``."""
    count = [0]
    for kind in POINTS:
        real = getattr(_files, kind)

        def hooked(*args, _real=real, _kind=kind):
            count[0] += 1
            return on_point(count[0], _kind, _real, args)
        setattr(_files, kind, hooked)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def main(folder: Path, mode: str, reg: str) -> None:
    bench = OfflineBenchmark(EncoderConfig(**TINY), progress=False)
    cfg = FinetuneConfig(mode=mode, reg=reg, steps=3, batch_size=8, lr=1e-3, warmup=1, checkpoint_every=1,
                         taujp_batch=4)
    task = "Digits"
    # One run here first: what the first run initializes lazily (seconds) is then inherited by
    # every forked child instead of being paid in each.
    finetune(bench, task, cfg, checkpoint_dir=folder / "warm-up", progress=False)

    def save_result(ckpt, out):
        def run():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = finetune(bench, task, cfg, checkpoint_dir=ckpt, progress=False)
            res.task_vector.save(out)
            Path(f"{out}.json").write_text(json.dumps({"steps": res.steps,
                                                       "warnings": [str(w.message) for w in caught]}))
        return run

    # 1. the uninterrupted run, and the write points of its checkpoints
    published = {}  # write point index -> step directory it published

    def record(index, kind, real, args):
        if kind == "publish":
            published[index] = Path(args[1]).name
        result = real(*args)
        if kind == "publish":
            Path(folder / "published.json").write_text(json.dumps(published))
        return result

    def counted():
        instrument(record)
        save_result(folder / "ref-ckpt", folder / "ref.safetensors")()
    assert in_child(counted) == 0, "the uninterrupted run failed"
    published = {int(k): v for k, v in json.loads((folder / "published.json").read_text()).items()}
    kinds = []

    def list_points(index, kind, real, args):
        kinds.append(kind)
        Path(folder / "kinds.json").write_text(json.dumps(kinds))
        return real(*args)

    def listed():
        instrument(list_points)
        finetune(bench, task, cfg, checkpoint_dir=folder / "list-ckpt", progress=False)
    assert in_child(listed) == 0
    kinds = json.loads((folder / "kinds.json").read_text())

    # 2. a kill at every point, before the write and torn in the middle of it; then resume
    report = {"points": len(kinds), "kinds": kinds, "published": published, "runs": []}
    for index, kind in enumerate(kinds, 1):
        for how in ("before", "torn"):
            ckpt = folder / f"ckpt-{index}-{how}"

            def killer(i, k, real, args, _target=index, _how=how):
                if i != _target:
                    return real(*args)
                if _how == "before":
                    kill_self()
                if k == "write_file":  # half of the file reaches the disk, then the kill
                    path, write = args
                    write(path)
                    size = path.stat().st_size
                    with open(path, "rb+") as f:
                        f.truncate(size // 2)
                elif k == "publish":  # the rename done, its folder's fsync not
                    os.replace(*args)
                else:  # discard: renamed to trash, not yet deleted
                    os.replace(args[0], _files.temporary_name(Path(args[0]), "trash"))
                kill_self()

            def killed_run(_killer=killer, _ckpt=ckpt):
                instrument(_killer)
                finetune(bench, task, cfg, checkpoint_dir=_ckpt, progress=False)
            status = in_child(killed_run)
            was_killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            done_before = [int(name.split("-")[1]) for i, name in published.items() if i < index]
            expected_start = max(done_before, default=0)
            if how == "torn" and kind == "publish":
                expected_start = int(published[index].split("-")[1])  # the rename itself is atomic
            out = folder / f"resumed-{index}-{how}.safetensors"
            resumed = in_child(save_result(ckpt, out))
            record_ = {"index": index, "kind": kind, "how": how, "killed": was_killed, "resume_status": resumed,
                       "expected_steps": cfg.steps - expected_start}
            if resumed == 0:
                record_.update(json.loads(Path(f"{out}.json").read_text()))
                ref, got = _files.read_safetensors(folder / "ref.safetensors")[0], _files.read_safetensors(out)[0]
                record_["bit_exact"] = set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
                record_["leftovers"] = sorted(p.name for p in ckpt.iterdir() if p.name != ".lock")
            report["runs"].append(record_)
    (folder / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
