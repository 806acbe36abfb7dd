"""Hugging Face side of Long-VITA: transformers classes for the released checkpoint layout.

`register_auto_classes()` (run by `import megatron_vita`) maps model_type "long_vita" to
these classes in transformers' Auto classes, so released checkpoints load with
`AutoModelForCausalLM.from_pretrained(dir)` and no remote code. Nothing here imports
megatron-core.
"""


def register_auto_classes() -> None:
    """Register LongVITAConfig / LongVITAModel / LongVITAForCausalLM with the Auto classes.

    Idempotent: a second call re-registers the same classes.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from megatron_vita.hf.configuration import LongVITAConfig
    from megatron_vita.hf.modeling import LongVITAForCausalLM, LongVITAModel

    AutoConfig.register(LongVITAConfig.model_type, LongVITAConfig, exist_ok=True)
    AutoModel.register(LongVITAConfig, LongVITAModel, exist_ok=True)
    AutoModelForCausalLM.register(LongVITAConfig, LongVITAForCausalLM, exist_ok=True)
