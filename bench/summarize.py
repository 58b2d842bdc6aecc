"""Print the markdown tables of a pytest-benchmark JSON written by this suite; or, with
``--readme``, the README's table from several result files, each row marked with the commit it
was measured at ("stale" where that is not the current commit).

    python bench/summarize.py bench/results/NAME.json
    python bench/summarize.py --readme bench/results/*.json
    python bench/summarize.py --name OUT/bench-orthoreg.json    # its canonical results/ file name
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.load(open(path))
    info = data["machine_info"]
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    print(f"device: {info.get('device')} | torch {info.get('torch')} | triton {info.get('triton')} | "
          f"fastortho {info.get('fastortho')} | commit {commit}\n")
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for group, rows in groups.items():
        print(f"### {group}\n")
        if group.startswith("orthoreg"):
            released = next((r["stats"]["median"] for r in rows if r["extra_info"]["impl"] == "released"), None)
            print("| impl | precision | median ms | TFLOP/s (min FLOPs) | GB/s | x floor | speed-up vs released |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                speed = f"{released / t:.1f}x" if released else "-"
                print(f"| {e['impl']} | {e['precision']} | {t * 1e3:.3f} | {e['flop_min'] / t / 1e12:.3g} | "
                      f"{e['bytes'] / t / 1e9:.0f} | {t / e['floor_s']:.2f} | {speed} |")
            e = rows[0]["extra_info"]
            print(f"\nfloor {e['floor_s'] * 1e3:.3f} ms = max({e['flop_min'] / 1e9:.0f} GFLOP / "
                  f"{e['peak_flops'] / 1e12:.3g} TFLOP/s, {e['bytes'] / 1e9:.2f} GB / "
                  f"{e['bandwidth'] / 1e12:.3g} TB/s)\n")
        elif group.startswith("lora"):
            dense = next((r["stats"]["median"] for r in rows if r["extra_info"]["impl"] == "released-dense"), None)
            print("| impl | precision | median ms | x floor | speed-up vs dense | value rel. err vs float64 |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                speed = f"{dense / t:.0f}x" if dense else "-"
                print(f"| {e['impl']} | {e['precision']} | {t * 1e3:.3f} | {t / e['floor_s']:.1f} | {speed} | "
                      f"{e['value_rel_err_vs_float64']:.1e} |")
            e = rows[0]["extra_info"]
            print(f"\n{e['adapters']} adapters; low-rank floor {e['floor_s'] * 1e3:.3f} ms = max("
                  f"{e['flop_low_rank'] / 1e9:.2f} GFLOP / {e['peak_flops'] / 1e12:.3g} TFLOP/s, "
                  f"{e['bytes_low_rank'] / 1e6:.0f} MB / {e['bandwidth'] / 1e9:.0f} GB/s)\n")
        elif group.startswith(("dual-linear", "attention-tangent")):
            torch_t = next((r["stats"]["median"] for r in rows if r["extra_info"]["policy"] == "torch"), None)
            print("| policy | median ms | TFLOP/s | x floor | speed-up vs torch ops |")
            print("|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                speed = f"{torch_t / t:.2f}x" if torch_t else "-"
                print(
                    f"| {e['policy']} | {t * 1e3:.3f} | {e['flop'] / t / 1e12:.1f} | {t / e['floor_s']:.2f} | {speed} |"
                )
            print()
        elif group.startswith("linearized-step"):
            by_kind = {r["extra_info"]["kind"]: r for r in rows}
            measure = rows[0]["extra_info"]["memory_measure"]
            print(f"| step | median ms | x ordinary | memory MB ({measure}) | x ordinary | GPU-busy ms | ATen ops |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                # a captured step is compared with the captured ordinary step
                plain = by_kind.get("ordinary-graph" if e["kind"].endswith("-graph") else "ordinary")
                tp = plain["stats"]["median"] if plain else None
                mp = plain["extra_info"]["peak_memory_bytes"] if plain else None
                busy = f"{e['gpu_busy_s'] * 1e3:.1f}" if "gpu_busy_s" in e else "-"
                ops = e.get("aten_ops", "-")
                print(f"| {e['kind']} | {t * 1e3:.1f} | {t / tp:.2f} | {e['peak_memory_bytes'] / 1e6:.0f} | "
                      f"{e['peak_memory_bytes'] / mp:.2f} | {busy} | {ops} |" if plain
                      else f"| {e['kind']} | {t * 1e3:.1f} | - | - | - | {busy} | {ops} |")
            print(f"\nbatch {rows[0]['extra_info']['batch']}\n")
        elif group.startswith("host"):
            print("| case | model | backend | layers | device ops (launches + ATen) | fastortho Python calls | "
                  "frames at a launch | ms here |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                if e["case"] == "linearized":
                    print(f"| linearized step | {e['model']} | - | - | {e['linearized_ops']} ATen ops vs "
                          f"{e['ordinary_ops']} ordinary: {e['ratio']:.2f}x, {e['ratio_with_constructions']:.2f}x "
                          f"with {e['constructions']} subclass constructions | - | - | - |")
                    continue
                print(f"| {e['case']} | {e['model']} | {e['backend']} | {e['layers']} | {e['device_ops']} "
                      f"({e['launches']} + {e['aten_ops']}) | {e['python_calls']} | {e['max_depth']} | "
                      f"{t * 1e3:.2f} |")
            print()
        elif group.startswith("merge"):
            times = {_merge_impl(r): r["stats"]["median"] for r in rows}
            print("| impl | seconds | speed-up vs FusionBench | vs one layer per call | vs one SVD at a time | "
                  "peak (vector sizes) | SVD GFLOP/s |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                e, t, impl = r["extra_info"], r["stats"]["median"], _merge_impl(r)
                ratio = {name: f"{times[name] / t:.2f}x" if name in times and name != impl else "-"
                         for name in ("fusionbench", "fastortho-per-layer", "fastortho-1-worker")}
                rate = f"{e['svd_flop'] / t / 1e9:.0f}" if e.get("svd_flop") else "-"
                print(f"| {impl} | {t:.3f} | {ratio['fusionbench']} | {ratio['fastortho-per-layer']} | "
                      f"{ratio['fastortho-1-worker']} | {e['peak_vectors']} | {rate} |")
            print()
        elif group.startswith("svd"):
            # per matrix, against fastortho's one-SVD-at-a-time route (torch's order, FusionBench's too)
            one = next((r["stats"]["median"] / r["extra_info"]["matrices"] for r in rows
                        if r["extra_info"]["impl"] == "fastortho-1-worker"), None)
            print("| route | dtype | matrices | median ms | ms per matrix | GFLOP/s | x faster per matrix than "
                  "one at a time |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                e, t = r["extra_info"], r["stats"]["median"]
                each = t / e["matrices"]
                speed = f"{one / each:.2f}x" if one else "-"
                print(f"| {e['impl']} | {e['dtype']} | {e['matrices']} | {t * 1e3:.1f} | {each * 1e3:.1f} | "
                      f"{e['flop'] / t / 1e9:.0f} | {speed} |")
            print()
        elif group.startswith("taujp"):
            loop = next((r["stats"]["median"] for r in rows if r["extra_info"]["kind"] == "released-loop"), None)
            cyc = next((r["stats"]["median"] for r in rows if r["extra_info"]["kind"] == "cyclical"), None)
            print("| penalty | median ms | speed-up vs released loop | x cyclical |")
            print("|---|---|---|---|")
            for r in rows:
                t = r["stats"]["median"]
                print(f"| {r['extra_info']['kind']} | {t * 1e3:.1f} | {loop / t:.2f}x | {t / cyc:.2f} |")
            e = rows[0]["extra_info"]
            print(f"\n{e['other_tasks']} other tasks x {e['images_per_task']} images\n")
        else:
            plain = next((r["stats"]["median"] for r in rows if r["extra_info"]["case"] == "none"), None)
            print("| case | median ms | overhead vs no penalty |")
            print("|---|---|---|")
            for r in rows:
                t = r["stats"]["median"]
                over = f"{(t / plain - 1) * 100:+.1f}%" if plain else "-"
                print(f"| {r['extra_info']['case']} | {t * 1e3:.2f} | {over} |")
            print()


def _merge_impl(record: dict) -> str:
    """A merge record's implementation (results before it was recorded: from the test id)."""
    impl = record["extra_info"].get("impl")
    if impl:
        return impl
    param = record["name"].split("[", 1)[-1].rstrip("]")
    return next((i for i in ("fastortho-per-layer", "fastortho-1-worker", "fastortho", "fusionbench")
                 if param.endswith(i)), param)


def _variant(extra: dict) -> str:
    for key in ("impl", "policy", "kind", "case"):
        if key in extra:
            return str(extra[key]) + (f" {extra['precision']}" if "precision" in extra and key == "impl" else "")
    return "?"


def result_name(data: dict) -> str:
    """``<device>-<YYYYMMDD>-<commit>``: the name of a result file in bench/results/."""
    device = re.sub(r"[^a-z0-9]+", "-", str(data["machine_info"].get("device", "unknown")).lower()).strip("-")
    date = str(data.get("datetime", ""))[:10].replace("-", "") or "undated"
    return f"{device}-{date}-{str(data.get('commit_info', {}).get('id', 'unknown'))[:7]}"


def current_commit() -> str:
    commit = os.environ.get("FASTORTHO_COMMIT")
    if commit:
        return commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def readme_table(paths) -> str:
    """One row per benchmark case, newest file last wins; the commit column says where each
    number comes from, and "stale" marks those not measured at the current commit."""
    head = current_commit()
    rows = {}
    for path in paths:
        data = json.load(open(path))
        commit = str(data.get("commit_info", {}).get("id", "unknown"))
        device = data["machine_info"].get("device", "?")
        for b in data.get("benchmarks", []):
            key = (device, b["group"], _variant(b.get("extra_info", {})))
            rows[key] = (b["stats"]["median"], commit, Path(path).name)
    lines = ["| device | case | variant | median ms | measured at |", "|---|---|---|---|---|"]
    for (device, group, variant), (median, commit, name) in sorted(rows.items()):
        stale = "" if head != "unknown" and head.startswith(commit[:7]) else " (stale)"
        lines.append(f"| {device} | {group} | {variant} | {median * 1e3:.3f} | {commit[:7]}{stale} ({name}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--readme"]:
        print(readme_table(sys.argv[2:]))
    elif sys.argv[1:2] == ["--name"]:
        print(result_name(json.load(open(sys.argv[2]))))
    else:
        main(sys.argv[1])
