"""vlm_prune.kernels: the backend rule, the torch reference against hand-built results, and the Triton kernels
bit-equal to the reference under Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it is first imported, so the `test_interpreted_*` tests run only in a child
pytest (started by `test_triton_kernels_bit_equal_under_the_interpreter` with TRITON_INTERPRET=1); in this process
they skip, and nothing here imports the Triton module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlm_prune.kernels import (
    KernelBackendError,
    backend,
    choose_backend,
    compact_sequence,
    gather_many,
    gather_tokens,
    resolve_backend,
    trim_layers,
)
from vlm_prune.kernels.reference import PadSlots, compact_reference, gather_reference, trim_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child pytest with TRITON_INTERPRET=1")
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------- helpers


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (-0.0 included), and `actual` contiguous.

    NaNs need only be NaN on both sides: torch's CPU gather rewrites a bf16 NaN's bits (0x7FC0 comes out 0xFFFF),
    while the kernels copy bits untouched.
    """
    if actual.dtype != expected.dtype or actual.shape != expected.shape or not actual.is_contiguous():
        return False
    kind = _INT_OF_SIZE[actual.element_size()]
    same = actual.view(kind) == expected.contiguous().view(kind)
    if actual.is_floating_point():
        same |= actual.isnan() & expected.isnan()
    return bool(same.all())


def ragged_index(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """(B, L') kept slots per row, ascending, left-padded with -1: row 0 keeps all L, row 1 keeps one, others random."""
    counts = torch.randint(1, length + 1, (batch,), generator=generator).tolist()
    counts[0] = length
    if batch > 1:
        counts[1] = 1
    width = max(counts)
    index = torch.full((batch, width), -1, dtype=torch.long)
    for row, count in enumerate(counts):
        kept = torch.randperm(length, generator=generator)[:count].sort().values
        index[row, width - count :] = kept
    return index


def noisy(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values with a NaN and a -0.0 in them, so that bit-equality means more than value-equality."""
    values = torch.randn(shape, generator=generator).to(dtype)
    flat = values.view(-1)
    flat[0] = float("nan")
    if flat.numel() > 1:
        flat[-1] = -0.0
    return values


# ---------------------------------------------------------------- the backend rule (no Triton needed)

# (device type, requested, triton importable, interpreter on) -> backend, or the error
RULE = [
    ("cpu", "auto", True, False, "torch"),
    ("cpu", "auto", False, False, "torch"),
    ("cpu", "auto", True, True, "torch"),
    ("cuda", "auto", True, False, "triton"),
    ("cuda", "auto", False, False, "torch"),
    ("cuda", "auto", True, True, "torch"),
    ("mps", "auto", True, False, "torch"),
    ("cpu", "torch", True, True, "torch"),
    ("cuda", "torch", True, False, "torch"),
    ("cuda", "triton", True, False, "triton"),
    ("cpu", "triton", True, True, "triton"),
    ("cuda", "triton", False, False, KernelBackendError),
    ("cpu", "triton", False, False, KernelBackendError),
    ("cpu", "triton", True, False, KernelBackendError),
    ("cuda", "triton", True, True, KernelBackendError),
    ("cuda", "cuda", True, False, KernelBackendError),
]


@pytest.mark.parametrize("device_type, requested, has_triton, interpreting, expected", RULE)
def test_choose_backend_rule(device_type, requested, has_triton, interpreting, expected):
    if expected is KernelBackendError:
        with pytest.raises(KernelBackendError):
            choose_backend(device_type, requested, has_triton, interpreting)
    else:
        assert choose_backend(device_type, requested, has_triton, interpreting) == expected


def test_resolve_backend_reads_triton_and_the_device(monkeypatch):
    cuda_tensor = SimpleNamespace(device=torch.device("cuda"))  # only .device is read: no GPU needed
    monkeypatch.setattr(backend, "triton_interpreting", lambda: False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert resolve_backend(cuda_tensor) == "triton"
    assert resolve_backend(cuda_tensor, "torch") == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert resolve_backend(cuda_tensor) == "torch"
    with pytest.raises(KernelBackendError, match="pip install triton"):
        resolve_backend(cuda_tensor, "triton")


def test_cpu_tensors_never_touch_triton_unless_asked(monkeypatch):
    def no_triton():
        raise AssertionError("auto/torch on CPU tensors must not import triton")

    monkeypatch.setattr(backend, "triton_available", no_triton)
    monkeypatch.setattr(backend, "triton_interpreting", no_triton)
    x = torch.randn(2, 5, 3)
    index = torch.tensor([[-1, 0, 4], [1, 2, 3]])
    assert resolve_backend(x) == "torch" and resolve_backend(x, "torch") == "torch"
    assert torch.equal(gather_tokens(x, index), gather_reference(x, index))
    assert torch.equal(compact_sequence(x, index).hidden, gather_reference(x, index))
    assert torch.equal(trim_layers([x.unsqueeze(1)], index)[0], gather_reference(x.unsqueeze(1), index, dim=2))


def test_cpu_tensors_with_triton_requested_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "triton_interpreting", lambda: False)
    with pytest.raises(KernelBackendError, match="needs CUDA tensors"):
        gather_tokens(torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="triton")


def test_unknown_backend_is_refused():
    with pytest.raises(KernelBackendError, match="unknown kernel backend"):
        gather_tokens(torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="cuda")


def test_bad_shapes_are_refused():
    hidden = torch.zeros(2, 4, 3)
    index = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(KernelBackendError, match="mask must be"):
        compact_sequence(hidden, index, mask=torch.ones(2, 3))
    with pytest.raises(KernelBackendError, match="columns must"):
        compact_sequence(hidden, index, columns=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(KernelBackendError, match="trim_layers takes"):
        trim_layers([torch.zeros(2, 4, 3)], index)


# ---------------------------------------------------------------- the reference against hand-built results


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("past", [0, 2])
@pytest.mark.parametrize("expanded_rope", [False, True])
def test_compact_reference_against_a_hand_loop(batch, past, expanded_rope):
    """Every side tensor's path: one row, contiguous ones (the hidden states' row index), a cached prefix (a mask
    slice) and an expanded (stride-0) rope (the broadcast gather)."""
    generator = torch.Generator().manual_seed(batch + past)
    length, dim, rows = 6, 4, 3
    hidden = torch.randn(batch, length, dim, generator=generator)
    index = ragged_index(generator, batch, length)
    columns = torch.arange(10, 10 + length).expand(batch, -1).clone()
    mask = torch.randint(0, 2, (batch, past + length), generator=generator)
    rope = torch.randint(0, 50, (rows, batch, length), generator=generator)
    if expanded_rope:
        rope = rope[:, :1].expand(-1, batch, -1)
    out = compact_reference(hidden, index, columns, mask, rope)
    width = index.shape[1]
    for row in range(batch):
        for slot in range(width):
            source = int(index[row, slot])
            if source < 0:
                assert (out.hidden[row, slot] == 0).all() and out.columns[row, slot] == -1
                assert out.mask[row, past + slot] == 0 and (out.rope[:, row, slot] == 0).all()
            else:
                assert torch.equal(out.hidden[row, slot], hidden[row, source])
                assert out.columns[row, slot] == columns[row, source]
                assert out.mask[row, past + slot] == mask[row, past + source]
                assert torch.equal(out.rope[:, row, slot], rope[:, row, source])
    assert torch.equal(out.mask[:, :past], mask[:, :past])
    assert out.mask.shape == (batch, past + width) and out.rope.shape == (rows, batch, width)
    flat = compact_reference(hidden, index, rope=rope[0]).rope
    assert torch.equal(flat, out.rope[0])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("padded", [None, True])
def test_gather_many_equals_one_gather_per_tensor(batch, padded):
    """The rotary cos / sin of an in-LLM stage: (B, L, d) tensors go together (one trim on their (B, 1, L, d) views),
    any other shape alone; each equals its own `gather_tokens`."""
    generator = torch.Generator().manual_seed(batch)
    index = ragged_index(generator, batch, 6)
    cos, sin = torch.randn(2, batch, 6, 4, generator=generator).unbind(0)  # (non-contiguous: views of one stack)
    positions = torch.randint(0, 9, (batch, 6), generator=generator)
    out = gather_many((cos, positions, sin), index, padded=padded)
    for got, tensor in zip(out, (cos, positions, sin)):
        assert got.shape == (batch, index.shape[1], *tensor.shape[2:])
        assert torch.equal(got, gather_tokens(tensor, index))


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_many_without_pads_takes_one_row_index_for_all(batch):
    """padded=False (no pad slot, known on the host): the (B, L, d) tensors share one row index, contiguous or not,
    and each still equals its own `gather_tokens`."""
    generator = torch.Generator().manual_seed(10 + batch)
    index = torch.stack([torch.randperm(7, generator=generator)[:4].sort().values for _ in range(batch)])
    cos = torch.randn(batch, 7, 4, generator=generator)
    sin = torch.randn(batch, 4, 7, generator=generator).transpose(1, 2)  # (non-contiguous)
    out = gather_many((cos, sin, cos * 2), index, padded=False)
    for got, tensor in zip(out, (cos, sin, cos * 2)):
        assert torch.equal(got, gather_tokens(tensor, index)) and got.is_contiguous()


def test_gather_many_refuses_an_index_of_another_batch_or_dtype():
    tokens = torch.zeros(2, 5, 3)
    with pytest.raises(KernelBackendError, match="index must be a"):
        gather_many((tokens,), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(KernelBackendError, match="long tensor"):
        gather_many((tokens,), torch.zeros(2, 4))


def test_trim_reference_against_a_hand_loop():
    generator = torch.Generator().manual_seed(1)
    index = ragged_index(generator, 2, 5)
    keys = torch.randn(2, 3, 5, 4, generator=generator)
    (trimmed,) = trim_reference([keys], index, fill=7.0)
    for row in range(2):
        for slot in range(index.shape[1]):
            source = int(index[row, slot])
            expected = keys[row, :, source] if source >= 0 else torch.full((3, 4), 7.0)
            assert torch.equal(trimmed[row, :, slot], expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_known_pad_flags_against_a_hand_loop(batch):
    """`padded=` (the engine's host knowledge) changes only the work: an index without -1 with padded=False, and a
    ragged one with padded=True, give the hand loop's values in the trim and the token gather."""
    generator = torch.Generator().manual_seed(batch)
    full = torch.stack([torch.randperm(6, generator=generator)[:4].sort().values for _ in range(batch)])
    ragged = ragged_index(generator, batch, 6)
    keys = torch.randn(batch, 2, 6, 3, generator=generator)
    tokens = torch.randn(batch, 6, 5, generator=generator)
    for index, padded in ((full, False), (ragged, True)):
        (trimmed,) = trim_reference([keys], index, fill=7.0, padded=padded)
        gathered = gather_reference(tokens, index, dim=1, fill=7.0, padded=padded)
        for row in range(batch):
            for slot in range(index.shape[1]):
                source = int(index[row, slot])
                key = keys[row, :, source] if source >= 0 else torch.full((2, 3), 7.0)
                token = tokens[row, source] if source >= 0 else torch.full((5,), 7.0)
                assert torch.equal(trimmed[row, :, slot], key) and torch.equal(gathered[row, slot], token)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_unread_pads_change_only_the_pad_slots(batch, strided):
    """unread_pads=True (the cache trim and the rotary cos / sin: pad slots are never read) gives the hand loop's
    values at every kept slot; a pad slot holds the row's slot-0 values on the torch path (a gather at the clamped
    index, without the fill), never something from another row or uninitialised memory."""
    generator = torch.Generator().manual_seed(20 + batch)
    index = ragged_index(generator, batch, 6)
    keys = torch.randn(batch, 6, 2, 3, generator=generator).transpose(1, 2) if strided else torch.randn(
        batch, 2, 6, 3, generator=generator)  # fmt: skip
    values = torch.randn(batch, 1, 6, 4, generator=generator)
    cos, sin = torch.randn(2, batch, 6, 4, generator=generator).unbind(0)
    trimmed = trim_layers([keys, values], index, fill=7.0, unread_pads=True)
    rotary = gather_many((cos, sin), index, fill=7.0, unread_pads=True)
    for row in range(batch):
        for slot in range(index.shape[1]):
            source = max(int(index[row, slot]), 0)
            assert torch.equal(trimmed[0][row, :, slot], keys[row, :, source])
            assert torch.equal(trimmed[1][row, :, slot], values[row, :, source])
            assert torch.equal(rotary[0][row, slot], cos[row, source])
            assert torch.equal(rotary[1][row, slot], sin[row, source])
    assert all(t.is_contiguous() for t in (*trimmed, *rotary))
    if batch > 1:  # (a ragged index: the default fills its pad slots, as before)
        assert (index == -1).any() and (trim_layers([keys], index, fill=7.0)[0].transpose(1, 2)[index < 0] == 7).all()


@pytest.mark.parametrize("seed, batch, rope_rows, past, strided", [
    (0, 1, 0, 0, False), (1, 3, 3, 0, False), (2, 4, 1, 2, False), (3, 5, 4, 0, True), (4, 2, 0, 3, True),
])  # fmt: skip
def test_compact_side_tensors_in_numpy_equal_the_torch_gathers(seed, batch, rope_rows, past, strided):
    """A host index of several rows takes the columns, mask and rotary positions in numpy; a device index (its
    stand-in) and one row the torch gathers. Same dtypes and values (pads: -1 columns, 0 elsewhere), ragged or not,
    contiguous or not, with past columns in the mask; float masks (numpy) and bf16 ones (torch only) too."""
    from vlm_prune.engine.syncs import on_device

    hidden, index, columns, mask, rope = _compact_case(seed, torch.float32, batch, rope_rows, past, strided)
    for side_mask in (mask, mask.float(), mask.to(torch.bfloat16)):
        host = compact_reference(hidden, index, columns, side_mask, rope)
        device = compact_reference(*on_device((hidden, index, columns, side_mask, rope)))
        full = torch.arange(index.shape[1]).expand(batch, -1) if index.shape[1] <= hidden.shape[1] else None
        for got, want in zip(host, device):
            assert type(got) is torch.Tensor and same_bits(got, want.as_subclass(torch.Tensor))
        if full is not None:  # an index without pads (padded=False), every slot kept
            plain = compact_reference(hidden, full.contiguous(), columns, side_mask, rope, padded=False)
            assert torch.equal(plain.mask[:, past:], side_mask[:, past:][:, : full.shape[1]])


def test_reference_reads_nothing_back_off_the_cpu():
    """On meta tensors any host read (`bool`, `item`) raises: the reference path must need none off the CPU."""
    hidden = torch.empty(3, 6, 4, device="meta")
    index = torch.empty(3, 4, dtype=torch.long, device="meta")
    columns = torch.empty(3, 6, dtype=torch.long, device="meta")
    out = compact_sequence(hidden, index, columns=columns, mask=torch.empty(3, 8, device="meta"), rope=columns)
    assert out.hidden.shape == (3, 4, 4) and out.mask.shape == (3, 6) and out.rope.shape == (3, 4)
    (trimmed,) = trim_layers([torch.empty(3, 2, 6, 5, device="meta")], index)
    assert trimmed.shape == (3, 2, 4, 5)


# ---------------------------------------------------------------- Triton, interpreted (child pytest only)


def _compact_case(seed: int, dtype: torch.dtype, batch: int, rope_rows: int, past: int, strided: bool):
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(2, 9, (1,), generator=generator))
    dim = int(torch.randint(1, 12, (1,), generator=generator))
    index = ragged_index(generator, batch, length)
    hidden = noisy(generator, (batch, length, dim), dtype)
    columns = torch.randperm(3 * length, generator=generator)[:length].sort().values.expand(batch, -1).clone()
    columns[0, 0] = -1  # a pad slot already in the input
    mask = torch.randint(0, 2, (batch, past + length), generator=generator)
    rope = torch.randint(0, 100, (max(rope_rows, 1), batch, length), generator=generator)
    if strided:  # non-contiguous views of every input
        hidden = noisy(generator, (batch, dim, length), dtype).transpose(1, 2)
        index = index.t().contiguous().t()
        columns = torch.stack([columns, columns], dim=-1)[..., 1]
        mask = mask.t().contiguous().t()
        rope = torch.stack([rope, rope], dim=-1)[..., 0]
        assert not (hidden.is_contiguous() or columns.is_contiguous() or rope.is_contiguous())
    if rope_rows == 0:
        rope = rope[0]  # the (B, L) layout
    return hidden, index, columns, mask, rope


@interpreted
@pytest.mark.parametrize(
    "seed, dtype, batch, rope_rows, past, strided",
    [
        (0, torch.bfloat16, 1, 1, 0, False),
        (1, torch.float32, 2, 3, 0, False),
        (2, torch.bfloat16, 3, 4, 5, True),
        (3, torch.float32, 5, 0, 2, True),
        (4, torch.float16, 8, 3, 3, False),
        (5, torch.bfloat16, 8, 3, 0, True),
        (6, torch.float32, 4, 1, 7, False),
    ],
)
def test_interpreted_compact_sequence_bit_equal(seed, dtype, batch, rope_rows, past, strided):
    hidden, index, columns, mask, rope = _compact_case(seed, dtype, batch, rope_rows, past, strided)
    expected = compact_reference(hidden, index, columns, mask, rope)
    actual = compact_sequence(hidden, index, columns=columns, mask=mask, rope=rope, backend="triton")
    for name, got, want in zip(expected._fields, actual, expected):
        assert same_bits(got, want), name


@interpreted
def test_interpreted_compact_sequence_without_side_outputs_and_bool_mask():
    generator = torch.Generator().manual_seed(7)
    hidden = noisy(generator, (3, 6, 5), torch.bfloat16)
    index = ragged_index(generator, 3, 6)
    mask = torch.rand(3, 9, generator=generator) > 0.3
    alone = compact_sequence(hidden, index, backend="triton")
    assert alone.columns is None and alone.mask is None and alone.rope is None
    assert same_bits(alone.hidden, gather_reference(hidden, index))
    with_mask = compact_sequence(hidden, index, mask=mask, backend="triton")
    assert same_bits(with_mask.mask, compact_reference(hidden, index, mask=mask).mask)
    empty = compact_sequence(hidden, index[:, :0], mask=mask, backend="triton")
    assert empty.hidden.shape == (3, 0, 5) and same_bits(empty.mask, mask[:, :3])


@interpreted
@pytest.mark.parametrize(
    "seed, dtypes, batch, heads, strided, head_dim",
    [
        (0, (torch.bfloat16,), 1, (2,), False, None),
        (1, (torch.float16, torch.float16), 2, (1, 3), True, None),
        (2, (torch.float32, torch.bfloat16, torch.float32), 4, (2, 2, 1), True, None),
        (3, (torch.bfloat16,) * 4, 8, (2, 2, 2, 2), False, 16),  # 16-byte vectors: the ALIGNED path
        (4, (torch.float32,) * 2, 3, (2, 1), True, 4),  # ALIGNED, strided
    ],
)
def test_interpreted_trim_layers_bit_equal(seed, dtypes, batch, heads, strided, head_dim):
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(2, 8, (1,), generator=generator))
    index = ragged_index(generator, batch, length)
    tensors = []
    for dtype, head_count in zip(dtypes, heads):
        head_dim = head_dim or int(torch.randint(1, 9, (1,), generator=generator))
        if strided:  # (B, S, H, d) storage seen as (B, H, S, d), as some attention kernels leave caches
            tensors.append(noisy(generator, (batch, length, head_count, head_dim), dtype).transpose(1, 2))
        else:
            tensors.append(noisy(generator, (batch, head_count, length, head_dim), dtype))
    for fill in (0, -1.5):
        expected = trim_reference(tensors, index, fill)
        actual = trim_layers(tensors, index, fill, backend="triton")
        assert len(actual) == len(expected)
        for position, (got, want) in enumerate(zip(actual, expected)):
            assert same_bits(got, want), position
    # unread pads: the kernel still writes the fill (in the same launch), so the reference's bits
    for got, want in zip(trim_layers(tensors, index, -1.5, backend="triton", unread_pads=True), expected):
        assert same_bits(got, want)


@interpreted
@pytest.mark.parametrize(
    "shape, dim, fill",
    [((3, 7, 5), 1, 0), ((2, 6), 1, -1), ((4, 2, 6, 3), 2, 0.25), ((2, 3, 5), 2, 0), ((2, 5, 1), 1, 1)],
)
def test_interpreted_gather_tokens_bit_equal(shape, dim, fill):
    generator = torch.Generator().manual_seed(len(shape) * 10 + dim)
    x = noisy(generator, shape, torch.float32) if len(shape) > 2 else torch.randint(0, 9, shape, generator=generator)
    index = ragged_index(generator, shape[0], shape[dim])
    assert same_bits(gather_tokens(x, index, dim, fill, backend="triton"), gather_reference(x, index, dim, fill))


def test_aligned_rule_for_vectorised_trim():
    """The launcher promises 16-byte rows and whole vectors only when they hold (else the kernel would misread)."""
    if INTERPRETED:
        pytest.skip("checked in the parent pytest")
    pytest.importorskip("triton", reason="the dev extra installs triton")
    from vlm_prune.kernels.triton_gather import _aligned

    base = torch.zeros(2, 4, 6, 16, dtype=torch.bfloat16)
    assert _aligned(base, 8)
    assert _aligned(torch.zeros(2, 6, 4, 16, dtype=torch.bfloat16).transpose(1, 2), 8)  # strided, still aligned
    assert _aligned(base[:1], 8)
    assert not _aligned(base[..., :12], 8)  # head dim not whole vectors
    assert not _aligned(base[:, :, 1:, 1:9], 8)  # rows start off 16 bytes
    assert not _aligned(torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16).transpose(2, 3)[:, :, :6], 8)  # d strided
    assert not _aligned(torch.zeros(2, 4, 6, 8, dtype=torch.float32)[:, :, :, :4].contiguous()[:, :, :, 1:], 4)


def _signature(kernel, pointers: dict[str, str], constants: dict) -> dict[str, str]:
    """Triton's signature of `kernel` as the launchers call it: named pointer types, the rest *i64 / i32 / constexpr."""
    return {
        name: "constexpr" if name in constants else pointers.get(name, "*i64") if name.endswith("_ptr") else "i32"
        for name in kernel.arg_names
    }


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice; these kernels do no math
@pytest.mark.parametrize("bits, arch, fast", [("i16", 90, True), ("i32", 80, False)])
def test_kernels_compile_for_nvidia_gpus(bits, arch, fast):
    """Both kernels lower to a cubin for sm_90 / sm_80 (ptxas ships with triton; no GPU needed), and on aligned
    inputs (`fast`: what Triton's launcher specialises for contiguous 16-byte-aligned tensors, and ALIGNED for the
    trim) every copy is a 128-bit load and store."""
    if INTERPRETED:
        pytest.skip("under the interpreter the kernels are not compiled")
    triton = pytest.importorskip("triton", reason="the dev extra installs triton")
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vlm_prune.kernels import triton_gather

    target = GPUTarget("cuda", arch, 32)
    element, vector = {"i16": (tl.int16, 8), "i32": (tl.int32, 4)}[bits]
    compact = triton_gather._compact_kernel
    compact_constants = {"HAS_COLUMNS": fast, "HAS_MASK": fast, "ROPE_ROWS": 3 if fast else 0}
    compact_constants |= {"BLOCK_T": 2, "BLOCK_D": 2048, "BLOCK_P": 64}
    compact_attrs = {}
    if fast:  # Triton specialises a stride of 1 to a constant and marks multiples of 16 (values and addresses)
        compact_constants["s_hd"] = 1
        divisible = ("hidden_ptr", "hidden_out_ptr", "dim", "s_hb", "s_hl")
        compact_attrs = {(compact.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    trim_constants = {"ELEMENT": element, "TABLE_COLUMNS": 8, "BLOCK_S": 32, "BLOCK_D": 128}
    trim_constants |= {"ALIGNED": fast, "VECTOR": vector}
    cases = [
        (compact, {"hidden_ptr": f"*{bits}", "hidden_out_ptr": f"*{bits}", "mask_ptr": "*i8"}, compact_constants),
        (triton_gather._trim_kernel, {}, trim_constants),
    ]
    for (kernel, pointers, constants), attrs in zip(cases, (compact_attrs, {})):
        signature = _signature(kernel, pointers, constants)
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target)
        ptx = compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 0 and "ld.global" in ptx
        vectorised = "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
        assert vectorised == fast, kernel.fn.__name__


def test_triton_kernels_bit_equal_under_the_interpreter():
    """Runs the `test_interpreted_*` tests above in a child pytest with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the child pytest")
    pytest.importorskip("triton", reason="the dev extra installs triton; without it the kernels cannot be checked")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-k", "interpreted"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]  # e.g. "17 passed, 27 deselected in 6.1s"
    assert re.search(r"\b\d+ passed", summary) and "skipped" not in summary, result.stdout[-2000:]


class _DeviceIndex(torch.Tensor):
    """A CPU tensor that stands for a device index (as `engine/syncs.py` marks one): PadSlots keeps torch ops."""


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layout", ["hidden", "mask", "rope", "cache"])
def test_pad_slots_fill_equals_masked_fill(seed, layout):
    """PadSlots fills exactly the -1 slots, on the host path (numpy, index_fill_ of the pad rows) and on the device
    path (masked_fill_), for every layout the gathers make; the hand-built expectation is a masked_fill."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = 1 + seed * 2, 7
    index = torch.randint(0, 9, (batch, width), generator=generator)
    pad_counts = torch.randint(0, width + 1, (batch,), generator=generator)
    pad_counts[0] = 0  # a row that keeps everything beside ragged ones
    for row, count in enumerate(pad_counts.tolist()):
        index[row, :count] = -1
    shapes = {"hidden": ((batch, width, 5), 0, 1), "mask": ((batch, width), 0, 1),
              "rope": ((3, batch, width), 1, 2), "cache": ((batch, 2, width, 4), 0, 2)}  # fmt: skip
    shape, batch_axis, seq_axis = shapes[layout]
    values = torch.randn(shape, generator=generator)
    where = [1] * len(shape)
    where[batch_axis], where[seq_axis] = batch, width
    expected = values.masked_fill((index < 0).view(where), -3.0)
    for probe in (index, index.as_subclass(_DeviceIndex)):
        pads = PadSlots(probe)
        assert torch.equal(pads.safe, index.clamp(min=0))
        out = pads.fill_(values.clone(), -3.0, batch_axis, seq_axis)
        assert torch.equal(out, expected), type(probe)
        strided = values.clone().transpose(-1, -2).contiguous().transpose(-1, -2) if values.ndim > 2 else None
        if strided is not None:  # a non-contiguous output takes the masked path, same values
            assert torch.equal(pads.fill_(strided, -3.0, batch_axis, seq_axis), expected)
    assert PadSlots(index, padded=False).any is False
    assert PadSlots(index[:1]).any is False  # the first row has no pad slot: nothing to fill, index kept
