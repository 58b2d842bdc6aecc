"""The README stays true (issue 21, item 11): its Python snippets run as written, in order, in
one namespace, with "ViT-B-32" replaced by a one-block ViT of the same open_clip family (the
README says so); its shell commands name options that exist; its links to the design point
inside the repository."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
open_clip = pytest.importorskip("open_clip")


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture()
def small_vit_b32(tmp_path):
    """An open_clip model config of ViT-B-32's family at one block and 64 pixels."""
    cfg = {"embed_dim": 32, "quick_gelu": False,
           "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "fastortho-readme-vit.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "fastortho-readme-vit"


def test_readme_python_snippets_run(small_vit_b32, tmp_path, monkeypatch, capsys):
    snippets = python_snippets()
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)  # the snippets write their files (lin.safetensors, plots) here
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        assert '"ViT-B-32"' in code or i > 0
        code = code.replace('"ViT-B-32"', f'"{small_vit_b32}"').replace("'ViT-B-32'", f"'{small_vit_b32}'")
        exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "trainable tensors" in printed  # the attention-only report
    assert "[]" in printed  # no op of an open_clip ViT takes the jvp fallback
    for name in ("lin.safetensors", "mnist.safetensors", "cosine.png", "taujp.png", "xi.png", "angles.png",
                 "radar.png", "alpha.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert tuple(namespace["D"].shape) == (2, 2)
    assert 0 <= namespace["res"].alpha <= 1


def test_readme_attention_only_report_is_the_real_one():
    """The report the README quotes for ViT-B-32 is what attention_only says on it."""
    import fastortho as fo

    quoted = re.search(r"on ViT-B-32: (\d+) trainable tensors, ([\d,]+) of ([\d,]+)", README)
    assert quoted
    vit = open_clip.create_model("ViT-B-32", pretrained=None).visual
    report = str(fo.attention_only(vit)[1])
    assert f"{quoted.group(1)} trainable tensors" in report and f"{quoted.group(2)} of {quoted.group(3)}" in report


def test_readme_commands_name_options_that_exist():
    from fastortho.commands import ablate, finetune
    from fastortho.commands import eval as eval_command

    parsers = {"fastortho-finetune": finetune.build_parser(), "fastortho-eval": eval_command.build_parser(),
               "fastortho-ablate": ablate.build_parser()}
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))  # the commands as written to run
    commands = re.findall(r"(fastortho-(?:finetune|eval|ablate)\b(?:\\\n|[^\n])*)", shell)
    assert len(commands) >= 4
    for command in commands:
        prog = command.split()[0]
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command.split("#")[0]))
        known = {o for a in parsers[prog]._actions if not isinstance(a, argparse._HelpAction)
                 for o in a.option_strings}
        assert options <= known, (prog, options - known)


def test_readme_export_command_names_options_that_exist():
    from fastortho import export

    shell = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    commands = re.findall(r"python -m fastortho\.export export\b((?:\\\n|[^\n])*)", shell)
    assert commands
    sub = next(a for a in export.build_parser()._actions if a.dest == "command").choices["export"]
    known = {o for a in sub._actions for o in a.option_strings}
    for command in commands:
        assert set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command.split("#")[0])) <= known, command


def test_readme_and_design_links_stay_inside_the_repo():
    for text in (README, (ROOT / "docs" / "design.md").read_text()):
        assert "DESIGN section" not in text  # the design is docs/design.md, inside the repo
        for path in re.findall(r"`((?:fastortho|kernels|tests|bench|docs|examples|csrc)/[\w./-]+\.(?:py|md|json|sh))`",
                               text):
            assert (ROOT / path).exists(), path
