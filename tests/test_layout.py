"""The layout stays what docs/design.md section 3 says: each op package's docstring maps its
files, the reading path of the design names things that exist, and imports point one way
(public modules -> ops -> kernels -> _config) with no cycle."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastortho"


def module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        rel = ("kernels",) + path.relative_to(ROOT / "kernels").with_suffix("").parts
    else:
        rel = path.relative_to(PKG).with_suffix("").parts
    rel = rel[:-1] if rel[-1] == "__init__" else rel
    return ".".join(("fastortho",) + rel)


def sources():
    return sorted(PKG.rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def imports(path: Path, top_level_only: bool):
    """The fastortho modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("fastortho"):
                if node.module:  # from pkg.mod import names: the module (and names that are submodules)
                    found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastortho"))
    known = {module_name(p) for p in sources()}
    return {m for m in found if m in known and m != me}


def test_op_package_docstrings_map_every_file():
    for pkg in ("orthoreg", "lora", "dual"):
        folder = PKG / "ops" / pkg
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        for f in folder.glob("*.py"):
            assert f"``{f.name}``" in doc, (pkg, f.name)


def test_design_reading_path_names_what_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    path = design[design.index("Reading path"):]
    for name, file in (("scratch_grad_kernel", "kernels/orthoreg.py"), ("def scratch_grads", "kernels/orthoreg.py"),
                       ("fastortho::ortho_scratch_grad", "fastortho/ops/orthoreg/triton_backend.py"),
                       ("def _backward", "fastortho/ops/orthoreg/triton_backend.py"),
                       ("def layer_penalty_grad", "fastortho/reference.py"),
                       ("def upstream_coefficient", "fastortho/ops/_common.py")):
        assert name.replace("def ", "") in path or name in path, name
        assert name in (ROOT / file).read_text(), (name, file)
    for file in re.findall(r"`((?:fastortho|kernels|tests|bench)/[\w/]+\.py)`", path):
        assert (ROOT / file).exists(), file


def test_imports_point_one_way():
    for path in sources():
        me = module_name(path)
        targets = imports(path, top_level_only=False)
        if me.startswith("fastortho.kernels"):
            bad = {t for t in targets if not (t.startswith("fastortho.kernels") or t == "fastortho._config")}
            assert not bad, (me, bad)
        elif me.startswith("fastortho.ops"):
            bad = {t for t in targets if not t.startswith(("fastortho.ops", "fastortho.kernels", "fastortho._config",
                                                           "fastortho._checks", "fastortho._files"))}
            assert not bad, (me, bad)
        elif me in ("fastortho._config", "fastortho._checks", "fastortho._files"):  # leaves: anything may import them
            assert not {t for t in targets if t.startswith("fastortho")}, me


def test_no_import_cycle_between_modules():
    graph = {module_name(p): imports(p, top_level_only=False) for p in sources()}
    # a package importing its own submodules is not a cycle of concern
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                # a submodule importing names from its own package __init__ closes a cycle too
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
