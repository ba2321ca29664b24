"""Compaction primitives: one function, `gather_tokens`, chosen at run time.

Today only the torch reference exists; a fused GPU kernel plugs in behind the same function.
"""

from vlm_prune.kernels.gather import gather_tokens

__all__ = ["gather_tokens"]
