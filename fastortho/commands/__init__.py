"""The console commands, one module each: ``finetune.py`` (``fastortho-finetune``),
``eval.py`` (``fastortho-eval``), ``ablate.py`` (``fastortho-ablate``); ``_common.py`` holds
their shared options. ``python -m fastortho.cli {finetune,eval,ablate}`` runs them too (and
``torchrun -m fastortho.cli finetune`` under DDP)."""
