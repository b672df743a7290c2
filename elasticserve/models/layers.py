"""Building blocks shared by the decoder models: RMSNorm, RoPE, gated SiLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from elasticserve.kernels import mkldnn_linear, native_ops
from elasticserve.models.hf_config import RopeScaling
from elasticserve.models.workspace import StepWorkspace


class Linear(nn.Module):
    """y = x W^T (+ b) with uninitialized parameters: every value comes from a checkpoint,
    so random init would only cost time.

    The weight is either plain or oneDNN-packed (`pack`, an opaque mkldnn tensor, also what
    a replica maps from shared weights that were packed before sharing); `forward` follows
    whichever the parameter holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return mkldnn_linear.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`forward(x)` written into `out` (x 2-D, a plain weight): the same BLAS call as
        F.linear (mm, or addmm with a bias), so the same bits."""
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)

    def pack(self) -> None:
        """Replace the weight by its oneDNN-packed form; the plain one is freed (unless
        referenced elsewhere), so the weight stays counted once."""
        if not self.weight.is_mkldnn:
            self.weight = nn.Parameter(mkldnn_linear.pack(self.weight), requires_grad=False)


class Embedding(nn.Module):
    """Token embedding table (uninitialized, filled by the loader)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in fp32 like the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False  # fused C op (kernels/native_ops.py) for fp32 CPU tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and native_ops.fits(x, self.weight):
            return native_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], including linear / llama3 scaling."""
    # Explicit CPU: the loader builds models under a torch.device(...) context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 context extension).
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary absolute positions (no length cap).

    inv_freq is a plain fp32 attribute rather than a buffer so that ``model.to(bf16)``
    cannot round the frequencies; it follows the positions' device lazily.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim] for broadcasting over heads."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               native: bool = False) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D]. ``native``: in place by the fused C op where the
    layout allows (fp32 CPU, heads dense), so x must not be needed un-rotated afterwards."""
    if native and native_ops.rope_fits(x, cos, sin):
        return native_ops.rope_(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.native = False  # fused C SiLU-and-mul for fp32 CPU tensors

    def forward(self, x: torch.Tensor, workspace: StepWorkspace | None = None) -> torch.Tensor:
        if workspace is not None and workspace.active:
            return self._forward_in(x, workspace)
        gate_up = self.gate_up_proj(x)
        if self.native and native_ops.fits(gate_up):
            return self.down_proj(native_ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def _forward_in(self, x: torch.Tensor, ws: StepWorkspace) -> torch.Tensor:
        """The same arithmetic with gate/up and the activation written into the step's
        workspace (a view it does not fit into is allocated as usual)."""
        t = x.shape[0]
        gate_up = ws.gate_up(t) if not self.gate_up_proj.weight.is_mkldnn else None
        if gate_up is None:
            gate_up = self.gate_up_proj(x)
        else:
            self.gate_up_proj.forward_into(x, gate_up)
        act = ws.activation(t)
        if self.native and native_ops.fits(gate_up):
            return self.down_proj(native_ops.silu_mul(gate_up, out=act))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        # gate_up is this layer's scratch: SiLU in place allocates nothing
        gate = F.silu(gate, inplace=True) if act is not None else F.silu(gate)
        return self.down_proj(gate * up if act is None else torch.mul(gate, up, out=act))
