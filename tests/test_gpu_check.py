"""bench/gpu_check.sh, the one-call GPU script, cannot rot between GPU runs: its dry run (the
same steps on this CPU: kernels under the interpreter, smallest benchmark cases, one round)
passes, its plan fits the device's 540 s, and the summary comes last."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_within_the_budget(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=2400, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    budget = int(re.search(r"^budget: (\d+) s", log, re.M).group(1))
    assert budget <= 540, budget
    tail = log.strip().splitlines()
    assert tail[-1].startswith("commit ") and any(line.startswith("## gpu_check summary") for line in tail[-20:])
    for step in ("install", "build", "correctness", "sanitizer", "bench-orthoreg", "bench-linearize"):
        assert re.search(rf"^\| {step} \| (ok|skipped|started)", log, re.M), step
    assert (out / "summary.json").exists()


def test_merge_plan_dry_run_passes_within_the_budget(tmp_path):
    """The merge methods' own device call (``--plan merge``): the same checks, dry."""
    out = tmp_path / "gpu-merge"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--plan", "merge", "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert int(re.search(r"^budget: (\d+) s", log, re.M).group(1)) <= 540
    assert log.strip().splitlines()[-1].startswith("commit ")
    for step in ("install", "correctness", "bench-merge", "bench-merge-1-worker"):
        assert re.search(rf"^\| {step} \| ok", log, re.M), step
    assert re.search(r"^\d+ passed", log, re.M)  # the device tests ran (their CPU cases, dry)
