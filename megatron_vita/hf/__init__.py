"""Hugging Face side of Long-VITA (transformers classes for the released layout)."""


def register_auto_classes() -> None:
    """Filled in with the HF classes (being written)."""
