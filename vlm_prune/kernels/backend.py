"""Which implementation of the compaction primitives runs: the fused Triton kernels or the torch reference.

The rule (`choose_backend`), a pure function so that every case is testable without a GPU:

    requested "torch"   -> torch, always (the reference; the oracle of the tests).
    requested "triton"  -> triton; a `KernelBackendError` if Triton cannot be imported, or if the tensors are
                           not where the kernels can run: CUDA tensors with Triton compiling, or CPU tensors
                           under Triton's interpreter (`TRITON_INTERPRET=1` set before Triton is first
                           imported: that is how the tests run the kernels without a GPU).
    requested "auto"    -> triton for CUDA tensors when Triton imports and compiles, torch for everything else
                           (CPU, MPS, meta, no Triton, or the interpreter: it is a test device, never a default).

The choice is an argument (`backend=` on every public function), never an environment variable.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from vlm_prune.errors import PruneError

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


class KernelBackendError(PruneError, ValueError):
    """A compaction backend that does not exist or cannot run on these tensors."""


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works here (cached: the import is attempted once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libraries)
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (Triton's own `TRITON_INTERPRET` flag)."""
    if not triton_available():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older releases read the variable directly
    if knobs is None:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def choose_backend(device_type: str, requested: str, has_triton: bool, interpreting: bool) -> str:
    """The backend ("triton" or "torch") for tensors on `device_type`; see the module docstring for the rule."""
    if requested not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device_type == "cuda" and has_triton and not interpreting else "torch"
    if not has_triton:
        raise KernelBackendError(
            "backend='triton' needs the triton package, which cannot be imported here; install it "
            "(pip install triton) or pass backend='auto' / 'torch'"
        )
    if interpreting and device_type != "cpu":
        raise KernelBackendError(
            f"backend='triton' under Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors only, got "
            f"{device_type} tensors; unset TRITON_INTERPRET to compile the kernels, or pass backend='torch'"
        )
    if not interpreting and device_type != "cuda":
        raise KernelBackendError(
            f"backend='triton' needs CUDA tensors, got {device_type} tensors; move them to the GPU, pass "
            "backend='auto' / 'torch', or set TRITON_INTERPRET=1 before triton is imported (CPU tests only)"
        )
    return "triton"


def resolve_backend(tensor: torch.Tensor, requested: str = "auto") -> str:
    """The backend that will run for `tensor` (checks Triton only when the answer depends on it)."""
    if requested == "torch" or (requested == "auto" and tensor.device.type != "cuda"):
        return "torch"  # (`choose_backend`'s answer for these, without asking: every stage asks)
    return choose_backend(tensor.device.type, requested, triton_available(), triton_interpreting())
