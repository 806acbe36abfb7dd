"""megatron-vita: Long-VITA on megatron-core for Ascend NPU, Nvidia GPU and CPU.

Importing the package registers the Hugging Face classes (model_type "long_vita") with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads a released
Long-VITA checkpoint without trust_remote_code. It does so without importing transformers:
already-imported Auto modules are registered with now, the others as they load (see
`megatron_vita.hf`), so `import megatron_vita` and the CLI stay light. megatron-core is only
imported by the parts that build Megatron models; its import-time torch.compile calls are
deferred to first use (`megatron_vita.parallel.megatron_import`: 5 s less per process).
"""
__version__ = "0.1.0"

from megatron_vita.hf import register_when_transformers_loads as _register_when_transformers_loads

from megatron_vita.parallel.megatron_import import install as _defer_megatron_compile

_register_when_transformers_loads()
_defer_megatron_compile()
