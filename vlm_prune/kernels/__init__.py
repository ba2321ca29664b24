"""Compaction primitives, each run by a fused Triton kernel on CUDA tensors or by the torch reference elsewhere.

`gather_tokens` (one tensor; `gather_many`: several (B, L, d) ones in one launch), `compact_sequence` (hidden
states + columns, mask and rotary positions in one launch) and `trim_layers` (every layer's keys and values in
one launch); `backend=` picks the implementation ("auto" by default, rule in `kernels/backend.py`).
`kernels/reference.py` holds the torch reference, the oracle.
"""

from vlm_prune.kernels.backend import KernelBackendError, choose_backend, resolve_backend, triton_available
from vlm_prune.kernels.gather import compact_sequence, gather_many, gather_tokens, trim_layers
from vlm_prune.kernels.reference import Compacted

__all__ = [
    "Compacted",
    "KernelBackendError",
    "choose_backend",
    "compact_sequence",
    "gather_many",
    "gather_tokens",
    "resolve_backend",
    "trim_layers",
    "triton_available",
]
