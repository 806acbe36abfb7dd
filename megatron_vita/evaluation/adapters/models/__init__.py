"""lmms-eval's plugin table: model name -> class in `megatron_vita.evaluation.adapters.models.<name>`."""
AVAILABLE_MODELS = {"long_vita": "LongVITA"}
