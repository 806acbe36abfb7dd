"""The lmms-eval model `long_vita`: lmms-eval's `lmms` interface over a Long-VITA Generator.

The class is built on first access of `LongVITA` (module `__getattr__`), because its base class
`lmms_eval.api.model.lmms` exists only where lmms-eval is installed; importing this module never
needs it. Interface (lmms_eval/api/model.py): `generate_until(requests)` where each request's
`args` are (context, gen_kwargs, doc_to_visual, doc_id, task, split) and the doc is
`self.task_dict[task][split][doc_id]`; `loglikelihood` and `generate_until_multi_round` are
abstract there. The video benchmarks (videomme, mvbench, longvideobench) are generate_until
tasks; loglikelihood needs token scores, which the Generator protocol does not expose, so it is
refused with a message instead of returning made-up numbers.
"""
from __future__ import annotations

from typing import Any, List, Tuple

from megatron_vita.evaluation.adapters.messages import HarnessModel

_BUILT = {}

# lmms-eval passes these to every model (create_from_arg_string's additional_config); they
# mean nothing to a Generator (one request at a time, device chosen by --backend).
_HARNESS_ONLY = ("batch_size", "device", "max_batch_size", "use_cache")


def _build():
    from lmms_eval.api.model import lmms

    class LongVITA(lmms):
        """Long-VITA (HF directory or Megatron checkpoint) for lmms-eval."""

        def __init__(self, pretrained: str, **kwargs: Any) -> None:
            super().__init__()
            for key in _HARNESS_ONLY:
                kwargs.pop(key, None)
            self.model = HarnessModel(pretrained, **kwargs)

        def generate_until(self, requests) -> List[str]:
            out = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
                text = self.model.lmms_generate(context, visuals, gen_kwargs)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

        def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
            raise NotImplementedError("long_vita: loglikelihood tasks need token scores, which the Generator "
                                      "interface does not provide; use generate_until tasks (videomme, mvbench, "
                                      "longvideobench, ...)")

        def generate_until_multi_round(self, requests) -> List[str]:
            raise NotImplementedError("long_vita: multi-round generation is not supported")

    try:
        from lmms_eval.api.registry import register_model
    except ImportError:  # older lmms-eval without the decorator: the plugin table still works
        return LongVITA
    return register_model("long_vita")(LongVITA)


def __getattr__(name: str):
    if name == "LongVITA":
        if "cls" not in _BUILT:
            _BUILT["cls"] = _build()
        return _BUILT["cls"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
