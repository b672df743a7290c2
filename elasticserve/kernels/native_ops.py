"""Fused element-wise ops from ``csrc/fused_ops.c``: RMSNorm, rotate-half RoPE, SiLU-and-mul.

Used by the model layers when ``CausalLM.use_native_ops(True)`` (the engine turns it on with
the native attention backend). Each function takes fp32 CPU tensors laid out as the model
produces them and returns what the torch expression it replaces returns.
"""

from __future__ import annotations

import ctypes

import torch

from elasticserve.kernels import native

_f32p = ctypes.POINTER(ctypes.c_float)
_F32 = torch.float32
# Below this many elements a call stays on one thread: a hand-off costs ~0.1 ms.
_SPLIT_MIN_ELEMENTS = 1 << 18


def _ptr(t: torch.Tensor) -> ctypes._Pointer[ctypes.c_float]:
    return ctypes.cast(t.data_ptr(), _f32p)


def _parts(elements: int, rows: int) -> int:
    return min(torch.get_num_threads(), rows) if elements >= _SPLIT_MIN_ELEMENTS else 1


def fits(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors whose last dimension is dense."""
    # called ~60 times a step: a plain loop and `is_cpu` (no device object) take ~1.4 us a
    # call where all() over a generator with `device.type` took 4-8 us
    for t in tensors:
        if t.dtype is not _F32 or not t.is_cpu or t.stride(-1) != 1:
            return False
    return True


def rope_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x [T, H, D] with dense heads (token rows any stride), cos/sin contiguous: rope_'s layout."""
    return fits(x, cos, sin) and x.stride(1) == x.shape[2] and cos.is_contiguous() \
        and sin.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` over the last dimension of a contiguous x."""
    fn = native.load_library().es_rms_norm_f32
    x = x.contiguous()
    dim = x.shape[-1]
    rows = x.numel() // dim
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    native.run_split(lambda first, step: fn(_ptr(x), dim, _ptr(weight), _ptr(out), dim, rows, dim,
                                            ctypes.c_float(eps), first, step),
                     _parts(x.numel(), rows))
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D] in place (heads dense, tokens any stride); cos/sin
    [T, 1, D] contiguous. Returns x."""
    fn = native.load_library().es_rope_f32
    t, heads, d = x.shape
    assert rope_fits(x, cos, sin), "rope_ needs fp32 CPU x with dense heads, contiguous cos/sin"
    native.run_split(lambda first, step: fn(_ptr(x), x.stride(0), heads, d, _ptr(cos), _ptr(sin),
                                            t, first, step),
                     _parts(x.numel(), t))
    return x


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for gate_up [T, 2I] contiguous, gate first; returns [T, I]
    (written into ``out``, a contiguous [T, I] fp32 tensor, when given)."""
    fn = native.load_library().es_silu_mul_f32
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = gate_up.new_empty(rows, inter)
    elif out.shape != (rows, inter) or not out.is_contiguous() or out.dtype != gate_up.dtype:
        raise ValueError(f"out must be a contiguous {gate_up.dtype} [{rows}, {inter}] tensor")
    native.run_split(lambda first, step: fn(_ptr(gate_up), _ptr(out), rows, inter, first, step),
                     _parts(gate_up.numel(), rows))
    return out
