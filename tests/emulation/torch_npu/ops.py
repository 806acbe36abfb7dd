"""EMULATION of three torch_npu fused ops, for the tests only: npu_rms_norm, npu_swiglu, npu_rotary_mul.

Nothing here ran on an NPU. Each function checks the argument contract that torch_npu / op-plugin
document for the op (see shared/reference/npu.md and the op-plugin pages cited below), raises
`ContractError` on a violation, counts the call in `torch_npu.CALLS`, and computes the documented
result with plain torch, so autograd differentiates it. Half-precision inputs are computed in
fp32 and rounded once at the end, as the kernels do internally.

Contracts (op-plugin docs, torch_npu 2.1 - 2.7):
  npu_rms_norm(self, gamma, epsilon=1e-6) -> (y, rstd)
      self: float16 / bfloat16 / float32, 2-8 dims. gamma: the same dtype, the trailing dims of
      self (usually its last one). y = self * rsqrt(mean(self^2 over gamma's dims) + eps) * gamma,
      self's dtype; rstd: float32, self's shape with gamma's dims set to 1.
  npu_swiglu(input, dim=-1)
      float16 / bfloat16 / float32, 1-8 dims, contiguous, not empty; dim in [-input.dim(),
      input.dim()-1] and input.size(dim) even. A, B = halves along dim: silu(A) * B.
  npu_rotary_mul(input, r1, r2, rotary_mode='half')
      input, r1 (cos), r2 (sin): 4-D, float16 / bfloat16 / float32 (one dtype). Layouts of input
      BNSD, BSND or SBND, with r1 / r2 of shape 11SD|B1SD|BNSD, 1S1D|BS1D|BSND, S11D|SB1D|SBND;
      D even and < 896; B, N < 1000; r1 / r2 values in [-1, 1]; B * N <= 1024 when r1 / r2 need
      gradients. half: rotate(x) = cat(-x2, x1); interleave: pairs (x[2i], x[2i+1]) ->
      (-x[2i+1], x[2i]). output = r1 * input + r2 * rotate(input).
"""
from __future__ import annotations

from numbers import Real
from typing import Iterable, List, Tuple

import torch
import torch.nn.functional as F

from torch_npu import CALLS, ContractError

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ROTARY_MODES = ("half", "interleave")
ROTARY_MAX_HEAD_DIM = 896  # D < 896
ROTARY_MAX_BN = 1000  # B, N < 1000
ROTARY_MAX_BN_WITH_R_GRAD = 1024

# input layout -> (the positions of B and N in input, the r1/r2 shapes allowed: which dims may be 1)
_ROTARY_LAYOUTS = {
    "BNSD": ((0, 1), ((1, 1, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0))),
    "BSND": ((0, 2), ((1, 0, 1, 0), (0, 0, 1, 0), (0, 0, 0, 0))),
    "SBND": ((1, 2), ((0, 1, 1, 0), (0, 0, 1, 0), (0, 0, 0, 0))),
}


def _fail(op: str, msg: str) -> None:
    raise ContractError(f"torch_npu.{op} (emulation): {msg}")


def _check_tensor(op: str, name: str, t, ndims: Iterable[int]) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        _fail(op, f"{name} dtype {t.dtype} is not float16, bfloat16 or float32")
    ndims = tuple(ndims)
    if t.dim() not in ndims:
        allowed = f"{ndims[0]}" if len(ndims) == 1 else f"{ndims[0]}-{ndims[-1]}"
        _fail(op, f"{name} has {t.dim()} dims (shape {tuple(t.shape)}); allowed: {allowed}")


def _same_dtype_and_device(op: str, first: Tuple[str, torch.Tensor], *others: Tuple[str, torch.Tensor]) -> None:
    name0, t0 = first
    for name, t in others:
        if t.dtype != t0.dtype:
            _fail(op, f"{name} dtype {t.dtype} differs from {name0} dtype {t0.dtype}")
        if t.device != t0.device:
            _fail(op, f"{name} is on {t.device}, {name0} on {t0.device}")


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """(y, rstd): RMS-normalise `self` over gamma's dims and scale by gamma (see the module docstring)."""
    op = "npu_rms_norm"
    _check_tensor(op, "self", self, range(2, 9))
    _check_tensor(op, "gamma", gamma, range(1, self.dim() + 1))
    _same_dtype_and_device(op, ("self", self), ("gamma", gamma))
    k = gamma.dim()
    if tuple(gamma.shape) != tuple(self.shape[-k:]):
        _fail(op, f"gamma shape {tuple(gamma.shape)} is not the trailing dims of self {tuple(self.shape)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not epsilon > 0:
        _fail(op, f"epsilon must be a positive float, got {epsilon!r}")
    CALLS[op] += 1
    dims = tuple(range(self.dim() - k, self.dim()))
    x32 = self.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + float(epsilon))
    y = x32 * rstd * gamma.float()
    return y.to(self.dtype), rstd


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """silu(A) * B with A, B the first and second half of `input` along `dim`."""
    op = "npu_swiglu"
    _check_tensor(op, "input", input, range(1, 9))
    if isinstance(dim, bool) or not isinstance(dim, int):
        _fail(op, f"dim must be an int, got {dim!r}")
    if not -input.dim() <= dim <= input.dim() - 1:
        _fail(op, f"dim {dim} is outside [{-input.dim()}, {input.dim() - 1}] for a {input.dim()}-D input")
    if input.numel() == 0:
        _fail(op, f"input is empty (shape {tuple(input.shape)})")
    if not input.is_contiguous():
        _fail(op, f"input is not contiguous (shape {tuple(input.shape)}, strides {input.stride()})")
    if input.shape[dim] % 2:
        _fail(op, f"input.size({dim}) = {input.shape[dim]} is odd; it is split in two halves")
    CALLS[op] += 1
    gate, up = torch.chunk(input.float(), 2, dim=dim)
    return (F.silu(gate) * up).to(input.dtype)


def _rotary_layouts(x: torch.Tensor, r: torch.Tensor) -> List[str]:
    """The input layouts under which r's shape is one the op accepts for x's shape."""
    found = []
    for layout, (_, patterns) in _ROTARY_LAYOUTS.items():
        for ones in patterns:
            want = tuple(1 if one else n for one, n in zip(ones, x.shape))
            if tuple(r.shape) == want:
                found.append(layout)
                break
    return found


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half":
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"):
    """input * r1 + rotate(input) * r2 (r1 = cos, r2 = sin), the layout inferred from r1's shape."""
    op = "npu_rotary_mul"
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        _check_tensor(op, name, t, (4,))
    _same_dtype_and_device(op, ("input", input), ("r1", r1), ("r2", r2))
    if rotary_mode not in ROTARY_MODES:
        _fail(op, f"rotary_mode {rotary_mode!r} is not one of {ROTARY_MODES}")
    d = input.shape[-1]
    if d % 2 or not d < ROTARY_MAX_HEAD_DIM:
        _fail(op, f"head dim D = {d} must be even and < {ROTARY_MAX_HEAD_DIM}")
    if r1.shape != r2.shape:
        _fail(op, f"r1 shape {tuple(r1.shape)} differs from r2 shape {tuple(r2.shape)}")
    layouts = _rotary_layouts(input, r1)
    if not layouts:
        _fail(op, f"r1/r2 shape {tuple(r1.shape)} fits no layout of input {tuple(input.shape)}: for BNSD "
                  "11SD/B1SD/BNSD, for BSND 1S1D/BS1D/BSND, for SBND S11D/SB1D/SBND")
    needs_r_grad = torch.is_grad_enabled() and (r1.requires_grad or r2.requires_grad)
    fitting = []
    for layout in layouts:
        b, n = (input.shape[i] for i in _ROTARY_LAYOUTS[layout][0])
        if b < ROTARY_MAX_BN and n < ROTARY_MAX_BN and not (needs_r_grad and b * n > ROTARY_MAX_BN_WITH_R_GRAD):
            fitting.append(layout)
    if not fitting:
        _fail(op, f"input {tuple(input.shape)} as {'/'.join(layouts)}: B and N must be < {ROTARY_MAX_BN}"
                  + (f" and B*N <= {ROTARY_MAX_BN_WITH_R_GRAD} when r1/r2 need gradients" if needs_r_grad else ""))
    for name, r in (("r1", r1), ("r2", r2)):
        if r.numel() and float(r.detach().abs().max()) > 1.0:
            _fail(op, f"{name} holds values outside [-1, 1] (max |{name}| = {float(r.detach().abs().max()):.4g})")
    CALLS[op] += 1
    x = input.float()
    return (x * r1.float() + _rotate(x, rotary_mode) * r2.float()).to(input.dtype)
