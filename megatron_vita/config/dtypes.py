"""Weight dtypes by their command-line names (`--dtype fp32|bf16|fp16`): the one table.

Every command that takes a dtype name (create-tiny, convert, verify) reads it here, so a name
means the same torch dtype everywhere and an unknown name gets the same one-line refusal. The
table holds torch attribute names, not dtypes: argument parsers import this without torch,
which is imported only when a name is turned into a dtype.
"""
from __future__ import annotations

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str, flag: str = "--dtype"):
    """The torch dtype a name stands for; ValueError naming `flag` for an unknown name."""
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r}: choose one of {sorted(DTYPES)}")
    import torch

    return getattr(torch, DTYPES[name])
