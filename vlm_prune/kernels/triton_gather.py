"""Fused Triton kernels for sequence compaction (imported only when the Triton backend is chosen).

Two kernels, each one launch:

* `_compact_kernel`: (B, L, D) hidden states -> (B, L', D) from each row's kept slots (-1 = pad slot, so ragged
  rows come out left-padded), and in the same launch the kept original columns (B, L'), the 2-D attention mask
  (B, P + L': the P cached columns copied, the current ones gathered) and the rotary positions (R, B, L').
* `_trim_kernel`: every layer's keys and values (B, H, S, d) -> (B, H, S', d). The tensors are separate
  allocations, so the launch reads a small table of (source address, destination address, heads, head dim,
  strides) per tensor, the multi-tensor pattern of PyTorch's `_foreach` kernels and Apex's multi_tensor_apply.

Both kernels move bits, not numbers: every tensor is viewed as the signed integer type of its element size
(bf16 / fp16 -> int16, fp32 -> int32, bool -> int8), so the result equals `torch.gather`'s bit for bit in every
dtype (-0.0 included; NaNs keep their payload, where torch's CPU gather rewrites a bf16 NaN's bits), and pad slots
hold the bit pattern of the fill value in the tensor's dtype. All strides are passed, so non-contiguous inputs are
read in place; outputs are contiguous like the reference's. Row and slot offsets are int64, so one tensor may hold
more than 2**31 elements.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlm_prune.kernels.reference import Compacted

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TL_BITS = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}
_TILE = 4096  # elements one program moves per step (BLOCK_T * BLOCK_D)


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels can move tensors of `dtype` (every dtype of 1, 2, 4 or 8 bytes)."""
    return torch.empty((), dtype=dtype).element_size() in _BITS


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` reinterpreted as the signed integer type of its element size (a view, no copy)."""
    return tensor.view(_BITS[tensor.element_size()])


@functools.cache
def _fill_bits(dtype: torch.dtype, fill: float | int) -> int:
    """The integer whose bits are `fill` converted to `dtype`, as `masked_fill` would store it."""
    value = torch.tensor(fill, dtype=dtype)
    return int(value.view(_BITS[value.element_size()]).item())


@triton.jit
def _compact_kernel(
    hidden_ptr, hidden_out_ptr, index_ptr,
    columns_ptr, columns_out_ptr, mask_ptr, mask_out_ptr, rope_ptr, rope_out_ptr,
    batch, new_length, dim, past, token_blocks, hidden_fill, columns_fill,
    s_hb, s_hl, s_hd, s_ib, s_il, s_cb, s_cl, s_mb, s_ml, s_rr, s_rb, s_rl,
    HAS_COLUMNS: tl.constexpr, HAS_MASK: tl.constexpr, ROPE_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Grid (token_blocks + prefix_blocks, B): a block of row b's slots, or a block of its cached mask columns."""
    block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if block < token_blocks:
        slot = block * BLOCK_T + tl.arange(0, BLOCK_T)
        in_range = slot < new_length
        source = tl.load(index_ptr + row * s_ib + slot * s_il, mask=in_range, other=-1)
        valid = source >= 0
        source = tl.where(valid, source, 0)
        read_rows = hidden_ptr + row * s_hb + source * s_hl
        write_rows = hidden_out_ptr + (row * new_length + slot) * dim
        for start in range(0, dim, BLOCK_D):
            feature = start + tl.arange(0, BLOCK_D)
            inside = feature < dim
            values = tl.load(
                read_rows[:, None] + feature[None, :] * s_hd, mask=valid[:, None] & inside[None, :], other=hidden_fill
            )
            tl.store(write_rows[:, None] + feature[None, :], values, mask=in_range[:, None] & inside[None, :])
        if HAS_COLUMNS:
            kept = tl.load(columns_ptr + row * s_cb + source * s_cl, mask=valid, other=columns_fill)
            tl.store(columns_out_ptr + row * new_length + slot, kept, mask=in_range)
        if HAS_MASK:
            kept = tl.load(mask_ptr + row * s_mb + (past + source) * s_ml, mask=valid, other=0)
            tl.store(mask_out_ptr + row * (past + new_length) + past + slot, kept, mask=in_range)
        for axis in tl.static_range(ROPE_ROWS):
            kept = tl.load(rope_ptr + axis * s_rr + row * s_rb + source * s_rl, mask=valid, other=0)
            tl.store(rope_out_ptr + (axis * batch + row) * new_length + slot, kept, mask=in_range)
    else:  # the cached columns of the mask are copied as they are (names differ: compiled branches must agree)
        cached = (block - token_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        cached_inside = cached < past
        cached_mask = tl.load(mask_ptr + row * s_mb + cached * s_ml, mask=cached_inside)
        tl.store(mask_out_ptr + row * (past + new_length) + cached, cached_mask, mask=cached_inside)


@triton.jit
def _trim_kernel(
    table_ptr, index_ptr, new_length, max_heads, fill, s_ib, s_is,
    ELEMENT: tl.constexpr, TABLE_COLUMNS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, VECTOR: tl.constexpr,
):  # fmt: skip
    """Grid (slot blocks, B * max_heads, tensors). Table row: source, destination, H, d, 4 source strides.

    The addresses come from a table, so the compiler cannot know their alignment: ALIGNED (checked by the
    launcher for every tensor) tells it that rows start on 16 bytes, features are contiguous and head dims are
    whole 16-byte vectors of VECTOR elements, which turns the copies into 128-bit loads and stores.
    """
    entry = table_ptr + tl.program_id(2).to(tl.int64) * TABLE_COLUMNS
    batch_head = tl.program_id(1).to(tl.int64)
    row = batch_head // max_heads
    head = batch_head % max_heads
    heads = tl.load(entry + 2).to(tl.int32)
    head_dim = tl.load(entry + 3).to(tl.int32)
    source_base = tl.load(entry + 0).to(tl.pointer_type(ELEMENT)) + row * tl.load(entry + 4) + head * tl.load(entry + 5)
    stride_slot = tl.load(entry + 6)
    stride_feature = tl.load(entry + 7)
    target_base = tl.load(entry + 1).to(tl.pointer_type(ELEMENT)) + ((row * heads + head) * new_length) * head_dim
    if ALIGNED:
        source_base = tl.multiple_of(source_base, 16)
        target_base = tl.multiple_of(target_base, 16)
        stride_slot = tl.multiple_of(stride_slot, VECTOR)
        head_dim = tl.multiple_of(head_dim, VECTOR)
        stride_feature = 1
    slot = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = slot < tl.where(head < heads, new_length, 0)  # heads past this tensor's H (mixed H) write nothing
    source = tl.load(index_ptr + row * s_ib + slot * s_is, mask=in_range, other=-1)
    valid = source >= 0
    source = tl.where(valid, source, 0)
    for start in range(0, head_dim, BLOCK_D):
        feature = start + tl.arange(0, BLOCK_D)
        inside = feature < head_dim
        values = tl.load(
            source_base + source[:, None] * stride_slot + feature[None, :] * stride_feature,
            mask=valid[:, None] & inside[None, :],
            other=fill,
        )
        tl.store(
            target_base + slot[:, None] * head_dim + feature[None, :], values, mask=in_range[:, None] & inside[None, :]
        )


def _aligned(tensor: torch.Tensor, vector: int) -> bool:
    """Whether every (row, head, slot) of a (B, H, S, d) tensor starts on 16 bytes and holds whole vectors."""
    *outer, feature = tensor.stride()
    return (
        tensor.data_ptr() % 16 == 0
        and feature == 1
        and tensor.shape[3] % vector == 0
        and all(stride % vector == 0 for stride, size in zip(outer, tensor.shape[:3]) if size > 1)
    )


def _blocks(length: int, width: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): a power-of-two tile of about `_TILE` elements for `length` slots of `width` features."""
    block_d = min(triton.next_power_of_2(max(width, 1)), _TILE)
    block_t = max(1, min(triton.next_power_of_2(max(length, 1)), _TILE // block_d))
    return block_t, block_d


def compact_triton(
    hidden: torch.Tensor,
    index: torch.Tensor,
    columns: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    rope: torch.Tensor | None = None,
) -> Compacted:
    """`reference.compact_reference` in one launch (same arguments, same bits)."""
    batch, length, dim = hidden.shape
    new_length = index.shape[1]
    device = hidden.device
    hidden_out = torch.empty((batch, new_length, dim), dtype=hidden.dtype, device=device)
    columns_out = mask_out = rope_out = None
    dummy = _bits(hidden_out)  # stands in for absent tensors (never read: the constexpr flags skip them)
    columns_in = columns_w = mask_in = mask_w = rope_in = rope_w = dummy
    columns_strides, mask_strides, rope_strides = (0, 0), (0, 0), (0, 0, 0)
    columns_fill, past, rope_rows = 0, 0, 0
    if columns is not None:
        columns_out = torch.empty((batch, new_length), dtype=columns.dtype, device=device)
        columns_in, columns_w = _bits(columns), _bits(columns_out)
        columns_strides, columns_fill = columns.stride(), _fill_bits(columns.dtype, -1)
    if mask is not None:
        past = mask.shape[1] - length
        mask_out = torch.empty((batch, past + new_length), dtype=mask.dtype, device=device)
        mask_in, mask_w, mask_strides = _bits(mask), _bits(mask_out), mask.stride()
    if rope is not None:
        rows = rope.unsqueeze(0) if rope.ndim == 2 else rope
        rope_rows = rows.shape[0]
        rope_out = torch.empty((rope_rows, batch, new_length), dtype=rope.dtype, device=device)
        rope_in, rope_w, rope_strides = _bits(rows), _bits(rope_out), rows.stride()
    block_t, block_d = _blocks(new_length, dim)
    block_p = min(triton.next_power_of_2(max(past, 1)), 1024)
    token_blocks = triton.cdiv(new_length, block_t)
    prefix_blocks = triton.cdiv(past, block_p) if mask is not None else 0
    if batch and token_blocks + prefix_blocks:
        _compact_kernel[(token_blocks + prefix_blocks, batch)](  # axis 0 has room for long sequences
            _bits(hidden), _bits(hidden_out), index,
            columns_in, columns_w, mask_in, mask_w, rope_in, rope_w,
            batch, new_length, dim, past, token_blocks, _fill_bits(hidden.dtype, 0), columns_fill,
            *hidden.stride(), *index.stride(), *columns_strides, *mask_strides, *rope_strides,
            HAS_COLUMNS=columns is not None, HAS_MASK=mask is not None, ROPE_ROWS=rope_rows,
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_P=block_p,
        )  # fmt: skip
    if rope_out is not None and rope.ndim == 2:
        rope_out = rope_out[0]
    return Compacted(hidden_out, columns_out, mask_out, rope_out)


def trim_triton(tensors: list[torch.Tensor], index: torch.Tensor, fill: float | int = 0) -> list[torch.Tensor]:
    """`reference.trim_reference` with one launch per dtype (one in practice: a cache has a single dtype).

    Args:
        tensors: (B, H_i, S, d_i) each, all on index's device; heads and head dims may differ between tensors.
        index: (B, S') long slots of S to keep, -1 = pad slot (filled with `fill`).
    """
    if not tensors:
        return []
    batch, new_length = index.shape
    outputs = [t.new_empty((batch, t.shape[1], new_length, t.shape[3])) for t in tensors]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)
    for dtype, positions in by_dtype.items():
        rows = [
            [source.data_ptr(), target.data_ptr(), source.shape[1], source.shape[3], *source.stride()]
            for source, target in ((tensors[i], outputs[i]) for i in positions)
        ]
        table = torch.tensor(rows, dtype=torch.int64).to(index.device, non_blocking=True)
        max_heads = max(tensors[i].shape[1] for i in positions)
        block_s, block_d = _blocks(new_length, max(tensors[i].shape[3] for i in positions))
        grid = (triton.cdiv(new_length, block_s), batch * max_heads, len(positions))
        vector = 16 // tensors[positions[0]].element_size()
        aligned = all(_aligned(tensors[i], vector) and _aligned(outputs[i], vector) for i in positions)
        if batch * max_heads and new_length:
            _trim_kernel[grid](
                table, index, new_length, max_heads, _fill_bits(dtype, fill), *index.stride(),
                ELEMENT=_TL_BITS[tensors[positions[0]].element_size()], TABLE_COLUMNS=table.shape[1],
                BLOCK_S=block_s, BLOCK_D=block_d, ALIGNED=aligned, VECTOR=vector,
            )  # fmt: skip
    return outputs
