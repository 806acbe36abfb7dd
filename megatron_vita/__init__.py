"""megatron-vita: Long-VITA on megatron-core for Ascend NPU, Nvidia GPU and CPU.

Importing the package registers the Hugging Face classes (model_type "long_vita") with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads a released
Long-VITA checkpoint without trust_remote_code. megatron-core is only imported by the parts
that build Megatron models.
"""
__version__ = "0.1.0"

from megatron_vita.hf import register_auto_classes as _register_auto_classes

_register_auto_classes()
