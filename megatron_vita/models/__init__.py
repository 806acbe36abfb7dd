"""Long-VITA on megatron-core: one folder per component (vision, projector, language, the combined model).

Model code here never asks which backend runs; backends differ only in the spec leaves
(models/common) that mindspeed_patches may swap on NPU.
"""
