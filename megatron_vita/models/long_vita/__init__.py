"""The combined Long-VITA model and the builder of per-rank pipeline chunks."""
