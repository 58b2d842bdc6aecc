"""OrthoReg on weights sharded by FSDP2 (``fully_shard``) or DTensor, without gathering them.

``fastortho.ortho_loss`` / ``OrthoReg`` route DTensor parameters here by themselves; this module
is what a user reads and tunes: :func:`set_exchange` (also ``fastortho.set_exchange``), the
per-layer exchange rule :func:`uses_gram_exchange`, and the traffic figures
:func:`communication_bytes`. The implementation is ``fastortho/ops/orthoreg/sharded.py``.
"""
from ._config import EXCHANGES, set_exchange
from .ops.orthoreg.sharded import (
                                   ShardedPenalty,
                                   chunk_bounds,
                                   communication_bytes,
                                   is_dtensor,
                                   local_base,
                                   shard_dim,
                                   sharded_ortho_penalty,
                                   uses_gram_exchange,
)

__all__ = ["EXCHANGES", "ShardedPenalty", "chunk_bounds", "communication_bytes", "is_dtensor", "local_base",
           "set_exchange", "shard_dim", "sharded_ortho_penalty", "uses_gram_exchange"]
