"""CI runs what the README says, at both ends of the supported range: ``.ci/run`` holds the
README's install and test commands for both environments, the oldest environment pins exactly
pyproject's lower bounds, and its test list names files that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def _commands(block: str) -> list[str]:
    lines = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line:
            lines.extend(part.strip() for part in line.split("&&"))
    return lines


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_install_and_tests_in_both_environments():
    ci = _ci_lines()
    newest_install = _readme_blocks("Install")[0]
    newest_test, oldest = _readme_blocks("Test")[:2]
    # the virtual environments: CI makes its own, in a temporary folder
    expected = [c for block in (newest_install, newest_test, oldest) for c in _commands(block) if ".venv" not in c]
    positions = []
    for command in expected:
        assert command in ci, f".ci/run does not run the README's {command!r}"
        positions.append(ci.index(command))
    assert positions == sorted(positions), "the README's commands run in another order in .ci/run"


def test_oldest_environment_pins_the_lower_bounds_pyproject_states():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r"^([a-z_]+)==([\d.]+)$", (ROOT / ".ci" / "oldest-constraints.txt").read_text(), re.M))
    for package in ("torch", "triton"):
        (bound,) = re.findall(rf'"{package}>=([\d.]+)', pyproject)
        assert pins[package].startswith(bound + "."), (package, bound, pins[package])
    readme = (ROOT / "README.md").read_text()
    assert f"torch {pins['torch'].rsplit('.', 1)[0]} through the newest" in readme
    assert f"triton {pins['triton'].rsplit('.', 1)[0]} through the newest" in readme


def test_oldest_test_list_names_existing_files_of_each_sensitive_part():
    listed = [line.strip() for line in (ROOT / ".ci" / "oldest-tests.txt").read_text().splitlines() if line.strip()]
    for path in listed:
        assert (ROOT / path).is_file(), path
    for needed in ("test_compile_gradients", "test_linearize", "test_orthoreg", "test_orthoreg_kernels", "test_lora",
                   "test_taujp", "test_dual_kernels", "test_kernel_resources"):
        assert f"tests/{needed}.py" in listed, needed
