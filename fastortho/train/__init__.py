"""Fine-tuning and evaluation of task vectors, one job per file:

- ``config.py``      ``FinetuneConfig`` (the papers' defaults), ``FinetuneResult``, modes and
                     regularizers
- ``loop.py``        :func:`finetune`: the training loop (modes, regularizers, DDP, resume)
- ``schedule.py``    the warm-up + cosine learning-rate factor
- ``data.py``        seeded batches (in-process or DataLoader workers), the tau-Jp input streams
- ``checkpoint.py``  saving and resuming a run's state
- ``memory.py``      autocast and the memory a run reports
- ``evaluate.py``    accuracy of an encoder on a split; the model task vectors apply to

The command-line scripts built on these are in ``fastortho/commands/``.
"""
from .config import MODES, REGULARIZERS, FinetuneConfig, FinetuneResult
from .data import batch_stream, sample_batch
from .evaluate import make_evaluator, pretrained_for
from .loop import finetune, prepare
from .schedule import cosine_with_warmup

__all__ = ["MODES", "REGULARIZERS", "FinetuneConfig", "FinetuneResult", "batch_stream", "cosine_with_warmup",
           "finetune", "make_evaluator", "prepare", "pretrained_for", "sample_batch"]
