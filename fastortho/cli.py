"""``python -m fastortho.cli {finetune,eval,ablate} [options]``: the console commands of
``fastortho/commands/`` behind one module, for ``torchrun -m`` (DDP fine-tuning):

    fastortho-ablate --demo                        # the offline benchmark, end to end, CPU
    fastortho-finetune --benchmark clip8 --model ViT-B-32 --weights ViT-B-32.pt --data-root ~/data \\
        --mode linear --reg taujp-cyclical --out runs/
    fastortho-eval --benchmark clip8 ... --vectors runs/linear-taujp-cyclical --out results/
    torchrun --nproc_per_node 8 -m fastortho.cli finetune ...      # DDP: every option as above
"""
from __future__ import annotations

import sys

from .commands import ablate, finetune
from .commands import eval as eval_command

COMMANDS = {"finetune": finetune.main, "eval": eval_command.main, "ablate": ablate.main}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m fastortho.cli {{{','.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
