"""Which kernel feature flag may run on which backend (the flags themselves: `config.features`).

  npu   every feature of mindspeed_patches.FEATURES (the real torch_npu kernels).
  cpu   every feature of FEATURES, but ONLY when the `torch_npu` that imports declares
        `IS_EMULATION = True`: the tests' pure-torch emulation of the torch_npu op contracts
        (tests/emulation). That runs the NPU glue on the CPU against the documented contracts;
        nothing about an NPU is claimed. Without it a flag is refused: there is no kernel.
  cuda  only the flags with a CUDA meaning (`config.features.CUDA_FEATURES`): `--use-flash-attn`
        selects the flash-attn attention leaf (models/common/cuda_leaves.py), which needs `flash_attn`.

`feature_problems` says, one line per flag, why a request cannot run; commands call it before
any rank is spawned (preflight, verify, spawn itself) and `platform.activate` refuses the same.
Nothing here imports torch_npu unless a feature is requested on the CPU (the only case where
the emulation question matters).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Iterable, List, Optional

from megatron_vita.config.features import CUDA_FEATURES, known_feature_names, normalize, npu_feature_names


def torch_npu_emulation() -> bool:
    """True when `import torch_npu` gives the tests' emulation (it declares IS_EMULATION = True).

    A real torch_npu is never imported here unless it is the one on the path and a feature was
    requested on the CPU; one that fails to import is no emulation."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        module = importlib.import_module("torch_npu")
    except Exception:  # a real torch_npu without CANN raises many kinds of errors
        return False
    return getattr(module, "IS_EMULATION", False) is True


def module_importable(name: str) -> Optional[str]:
    """None when `name` imports, else why not (one line)."""
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    try:
        importlib.import_module(name)
    except Exception as e:  # a CUDA extension built for another torch fails in many ways
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{name} does not import ({type(e).__name__}: {first})"
    return None


def feature_problems(backend: str, features: Iterable[str], dtype: Optional[str] = None) -> List[str]:
    """Why each requested flag cannot run on `backend`, one line each naming the flag.
    `dtype`: the compute dtype (fp32 / bf16 / fp16) when known: flash-attn has no fp32 kernel."""
    requested = list(dict.fromkeys(normalize(f) for f in features))
    if not requested:
        return []
    npu_names, out = npu_feature_names(), []
    emulation: Optional[bool] = None
    for name in requested:
        flag = f"--{name}"
        if name not in npu_names and name not in CUDA_FEATURES:
            out.append(f"{flag}: not a kernel feature flag (known: "
                       f"{', '.join('--' + n for n in known_feature_names()) or 'none'})")
        elif backend == "npu":
            if name not in npu_names:
                out.append(f"{flag}: has no NPU implementation in mindspeed_patches (drop it on --backend npu)")
        elif backend == "cuda":
            if name not in CUDA_FEATURES:
                out.append(f"{flag}: an NPU kernel (torch_npu) with no CUDA counterpart here; drop it on "
                           "--backend cuda")
            else:
                module, requirement = CUDA_FEATURES[name]
                why = module_importable(module)
                if why:
                    out.append(f"{flag} on --backend cuda needs {requirement}: {why}")
                elif name == "use-flash-attn" and dtype == "fp32":
                    out.append(f"{flag} on --backend cuda computes in fp16/bf16 (flash-attn has no fp32 "
                               "kernel): train with --bf16, verify with --dtype bf16")
        elif backend == "cpu":
            if name not in npu_names:
                out.append(f"{flag}: a CUDA kernel flag; it does nothing on --backend cpu (drop it)")
                continue
            if emulation is None:
                emulation = torch_npu_emulation()
            if not emulation:
                out.append(f"{flag}: an NPU kernel (torch_npu); --backend cpu applies it only against the "
                           "tests' torch_npu emulation (IS_EMULATION = True, tests/emulation on PYTHONPATH), "
                           "and none imports here; use --backend npu or drop the flag")
        else:
            out.append(f"{flag}: unknown backend {backend!r}")
    return out
