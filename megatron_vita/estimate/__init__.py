"""Per-device memory of a Long-VITA training configuration (`megatron-vita estimate`).

  inputs       EstimateInputs: model, ParallelConfig layout, batch, recompute, media; training's checks
  params       parameters per rank and part, counted from the sizes
  activations  bytes each layer / part keeps for backward, tensor by tensor
  core         the table of terms per pipeline stage and the device's peak
  cli          the command line (add_arguments / run)
An estimate is arithmetic on the configuration: no model is built, nothing is allocated.
"""
from megatron_vita.estimate.core import MODELLED, NOT_MODELLED, MemoryEstimate, StageEstimate, Term, estimate
from megatron_vita.estimate.inputs import EstimateInputs

__all__ = ["EstimateInputs", "MODELLED", "MemoryEstimate", "NOT_MODELLED", "StageEstimate", "Term", "estimate"]
