"""The public compaction primitives, each dispatched at run time to the fused Triton kernels or the torch reference.

    gather_tokens(x, index, dim, fill)              one tensor along its sequence axis (the original interface)
    compact_sequence(hidden, index, columns=, mask=, rope=)   hidden states + their slot metadata, one launch
    trim_layers(tensors, index)                     every layer's keys and values, one launch

Every function takes `backend="auto" | "triton" | "torch"` (rule in `kernels/backend.py`): "auto" runs Triton on
CUDA tensors when it imports, the torch reference (`kernels/reference.py`) everywhere else. Both give the same bits.
Index convention everywhere: (B, L') long, the slot of the input to take for each output slot, -1 = pad slot.

Engine adoption: `engine/stage_run.run_stage` compacts hidden states, columns, mask and rotary positions with one
`compact_sequence` per stage, and `engine/ragged.trim_segments` trims every layer of a segment with one
`trim_layers` call; both take an index the engine built on the host and uploaded without a sync
(`engine/batch.py`).
"""

from __future__ import annotations

import torch

from vlm_prune.kernels.backend import KernelBackendError, resolve_backend
from vlm_prune.kernels.reference import Compacted, compact_reference, gather_reference, take_rows_all, trim_reference


def _as_4d(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """A (B, H, L, d) view of x with its sequence axis `dim` at position 2, or None if no view has that form."""
    if dim == 1 and x.ndim in (2, 3):
        return x.unsqueeze(1) if x.ndim == 3 else x.unsqueeze(1).unsqueeze(-1)
    if dim == 2 and x.ndim in (3, 4):
        return x if x.ndim == 4 else x.unsqueeze(-1)
    return None


def _check_index(x: torch.Tensor, index: torch.Tensor) -> None:
    if index.ndim != 2 or index.shape[0] != x.shape[0] or index.dtype != torch.long or index.device != x.device:
        raise KernelBackendError(
            f"index must be a (B={x.shape[0]}, L') long tensor on {x.device}, got {index.dtype} "
            f"{tuple(index.shape)} on {index.device}"
        )


def gather_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    dim: int = 1,
    fill: float | int = 0,
    backend: str = "auto",
    padded: bool | None = None,
) -> torch.Tensor:
    """Gather along the sequence dimension, with -1 meaning "padding slot".

    Args:
        x: (B, L, *rest) when dim=1, or any tensor whose `dim` is the sequence axis and whose dim 0 is the batch
           (e.g. (B, H, L, d) caches with dim=2).
        index: (B, L') long. Column of x to take for each output slot; -1 fills with `fill`.
        dim: the sequence axis of x.
        backend: "auto", "triton" or "torch" (see `kernels/backend.py`).
        padded: whether `index` holds pad slots, when the caller knows it on the host (the torch path then
            skips finding and filling them); None = find out.

    Returns:
        (B, L', *rest) (sequence axis replaced by L'), contiguous.
    """
    if resolve_backend(x, backend) == "torch":
        return gather_reference(x, index, dim, fill, padded)
    from vlm_prune.kernels.triton_gather import supports, trim_triton

    dim = dim % x.ndim
    view = _as_4d(x, dim)
    if view is None or not supports(x.dtype):
        if backend == "triton":
            raise KernelBackendError(
                f"the Triton gather takes (B, L[, D]) with dim=1 or (B, H, L[, d]) with dim=2 of 1/2/4/8-byte "
                f"dtypes, got {x.dtype} {tuple(x.shape)} with dim={dim}; pass backend='torch'"
            )
        return gather_reference(x, index, dim, fill)
    _check_index(x, index)
    (out,) = trim_triton([view], index, fill)
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    return out.view(shape)


def compact_sequence(
    hidden: torch.Tensor,
    index: torch.Tensor,
    *,
    columns: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    rope: torch.Tensor | None = None,
    backend: str = "auto",
    padded: bool | None = None,
) -> Compacted:
    """Keep `index`'s slots of a sequence and of its slot metadata, in one launch on the Triton backend.

    Args:
        hidden: (B, L, D) hidden states.
        index: (B, L') long, the slot of L for each output slot, -1 = pad slot (rows left-padded when ragged).
        columns: (B, L) original column of every slot (pad slots come out -1).
        mask: (B, P + L) 2-D attention mask, the P cached columns first (copied); the L current ones are gathered.
        rope: (R, B, L) rotary positions (R = 1, 3 or 4 rows for M-RoPE), or (B, L).
        backend: "auto", "triton" or "torch" (see `kernels/backend.py`).
        padded: whether `index` holds pad slots (-1), when the caller knows it on the host (the torch path then
            skips finding and filling them); None = find out.

    Returns:
        `Compacted(hidden (B, L', D), columns (B, L'), mask (B, P + L'), rope (R, B, L') or (B, L'))`, every
        tensor new and contiguous; an output is None when its input was.
    """
    if hidden.ndim != 3:
        raise KernelBackendError(f"hidden must be (B, L, D), got {tuple(hidden.shape)}")
    batch, length = hidden.shape[:2]
    for name, tensor, shape in (("columns", columns, (batch, length)), ("rope", rope, (batch, length))):
        if tensor is not None and (tuple(tensor.shape[-2:]) != shape or tensor.ndim not in (2, 3)):
            raise KernelBackendError(f"{name} must end in (B, L) = {shape}, got {tuple(tensor.shape)}")
    if mask is not None and (mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] < length):
        raise KernelBackendError(f"mask must be (B, P + L) with B={batch}, L={length}, got {tuple(mask.shape)}")
    if resolve_backend(hidden, backend) == "torch":
        return compact_reference(hidden, index, columns, mask, rope, padded=padded)
    from vlm_prune.kernels.triton_gather import compact_triton, supports

    tensors = [t for t in (hidden, columns, mask, rope) if t is not None]
    if not all(supports(t.dtype) and t.device == hidden.device for t in tensors):
        raise KernelBackendError(
            "compact_sequence's Triton path needs every tensor on hidden's device in a 1/2/4/8-byte dtype, got "
            + ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
        )
    _check_index(hidden, index)
    return compact_triton(hidden, index, columns, mask, rope)


def trim_layers(
    tensors: list[torch.Tensor],
    index: torch.Tensor,
    fill: float | int = 0,
    backend: str = "auto",
    padded: bool | None = None,
    unread_pads: bool = False,
) -> list[torch.Tensor]:
    """Gather every cache tensor down to the kept slots, in one launch on the Triton backend.

    Args:
        tensors: (B, H_i, S, d_i) keys and values of every layer to trim (any mix of dtypes; heads and head dims
                 may differ between layers; each may be non-contiguous).
        index: (B, S') long, the slot of S for each output slot, -1 = pad slot (filled with `fill`).
        backend: "auto", "triton" or "torch" (see `kernels/backend.py`).
        padded: whether `index` holds pad slots, when the caller knows it on the host (the torch path then skips
            finding and filling them); None = find out.
        unread_pads: the caller never reads the pad slots (a cache's pad slots are masked in every later call), so
            their values are unspecified: finite values of the same row (the torch path gathers them from slot 0
            and skips the fill; the Triton kernel writes `fill`, in the same launch). Non-pad slots are the same.

    Returns:
        The trimmed tensors, (B, H_i, S', d_i) each, new and contiguous, in the order given.
    """
    if not tensors:
        return []
    device = tensors[0].device
    for tensor in tensors:
        if tensor.ndim != 4 or tensor.shape[0] != index.shape[0] or tensor.device != device:
            raise KernelBackendError(
                f"trim_layers takes (B={index.shape[0]}, H, S, d) tensors on one device, got "
                f"{tuple(tensor.shape)} on {tensor.device}"
            )
    if resolve_backend(tensors[0], backend) == "torch":
        return trim_reference(tensors, index, fill, padded, unread_pads)
    from vlm_prune.kernels.triton_gather import supports, trim_triton

    if not all(supports(t.dtype) for t in tensors):
        raise KernelBackendError(f"trim_layers' Triton path moves 1/2/4/8-byte dtypes, got {tensors[0].dtype}")
    index = index.to(tensors[0].device)
    _check_index(tensors[0], index)
    return trim_triton(tensors, index, fill)


def gather_many(
    tensors: tuple[torch.Tensor, ...],
    index: torch.Tensor,
    fill: float | int = 0,
    padded: bool | None = None,
    unread_pads: bool = False,
) -> list[torch.Tensor]:
    """`gather_tokens(t, index, dim=1, fill)` of every tensor, the (B, L, d) ones together: one `trim_layers` call
    on their (B, 1, L, d) views (one launch on the Triton backend; on the torch path the index is prepared once
    for all of them), e.g. the rotary cos and sin after an in-LLM stage. Other shapes go one by one.

    padded: whether `index` holds pad slots, when the caller knows it on the host (see `gather_tokens`).
    unread_pads: the caller never reads the pad slots (e.g. the rotary cos and sin of pad slots, whose queries and
    keys are masked): the (B, L, d) tensors' pad values are unspecified, as in `trim_layers`.
    """
    for tensor in tensors:  # (a bad index or batch is refused here, with what to pass, for every backend)
        _check_index(tensor, index)
    if padded is False and all(t.ndim == 3 for t in tensors) and resolve_backend(tensors[0]) == "torch":
        # no pad slot (known on the host): one row index for every (B, L, d) tensor, one index_select each
        return take_rows_all(tensors, index)
    together = [t.ndim == 3 for t in tensors]
    out = [None if joint else gather_tokens(t, index, 1, fill, padded=padded) for t, joint in zip(tensors, together)]
    joint = [t.unsqueeze(1) for t, flag in zip(tensors, together) if flag]
    gathered = iter(trim_layers(joint, index, fill, padded=padded, unread_pads=unread_pads))
    return [next(gathered).squeeze(1) if value is None else value for value in out]
