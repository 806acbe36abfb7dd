"""An EMULATION of the torch_npu op contracts, in pure torch, for the tests only.

This is not torch_npu and nothing here runs on an NPU. It lets the NPU code paths
(mindspeed_patches features) run on CPU against the documented contracts of the ops they call
(shared/reference/npu.md), checked strictly: layout strings, shapes, the mask shape of each
sparse mode, the cumulative-length rules. A call that breaks a contract raises here, so the
tests catch glue that would break on a real NPU. Results computed with it are emulation
results, never NPU results.

Put `tests/emulation` on `sys.path` / PYTHONPATH to make `import torch_npu` find it.
`IS_EMULATION = True` is what megatron_vita.platform reads: auto-detection never selects the
npu backend for it, and the NPU features may then be applied on `--backend cpu`.

Shared by the op submodules: `ContractError`, what a broken contract raises (a RuntimeError, as
torch_npu's own argument checks are), and `CALLS`, how often each op was called in this process,
so a test can prove that a patched code path really reached the op.
"""
import collections
import importlib

IS_EMULATION = True


class ContractError(RuntimeError):
    """A call that breaks the documented contract of a torch_npu op (it would fail on an NPU)."""


CALLS: "collections.Counter[str]" = collections.Counter()

# op name -> the submodule that emulates it
_OPS = {
    "npu_rms_norm": "ops",
    "npu_swiglu": "ops",
    "npu_rotary_mul": "ops",
    "npu_fusion_attention": "fusion_attention",
    "npu_fusion_attention_grad": "fusion_attention",
}


def __getattr__(name):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"torch_npu emulation has no {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["IS_EMULATION", "ContractError", "CALLS", *_OPS]
