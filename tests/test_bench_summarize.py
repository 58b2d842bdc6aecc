"""bench/summarize.py prints the tables of every pytest-benchmark JSON in bench/results/: a GPU
run's summary step goes through it, and a branch that crashes there loses the call's tables."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_pytest_benchmark(path: Path) -> bool:
    data = json.loads(path.read_text())
    return isinstance(data, dict) and "benchmarks" in data


RESULTS = sorted(p for p in (ROOT / "bench" / "results").glob("*.json") if _is_pytest_benchmark(p))


def summarize(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "summarize.py"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_group_gets_a_table(path):
    data = json.loads(path.read_text())
    text = summarize(str(path))
    for group in {b["group"] for b in data["benchmarks"]}:
        assert f"### {group}\n" in text
    # one table row per record (every branch prints its rows as "| ... |")
    assert text.count("\n| ") >= len(data["benchmarks"])


def test_svd_rows_are_per_matrix_against_one_at_a_time():
    path = next(p for p in RESULTS if p.stem.endswith("-svd"))
    data = json.loads(path.read_text())
    text = summarize(str(path))
    for b in data["benchmarks"]:
        e = b["extra_info"]
        row = re.search(rf"^\| {re.escape(e['impl'])} \| {e['dtype']} \| {e['matrices']} \| [^|]+ \| ([0-9.]+) \|"
                        rf" [^|]+ \| ([0-9.]+)x \|$", text.split(f"### {b['group']}\n")[1], re.M)
        assert row, (b["name"], text)
        assert float(row[1]) == pytest.approx(b["stats"]["median"] / e["matrices"] * 1e3, abs=0.051)
        if e["impl"] == "fastortho-1-worker":
            assert row[2] == "1.00"
