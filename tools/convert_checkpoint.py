#!/usr/bin/env python
"""Checkpoint conversion as a script: the same as `megatron-vita convert ...` (see --help).

    python tools/convert_checkpoint.py --from hf --to megatron --input Long-VITA-16K_HF \
        --output ckpt/long-vita-16k-tp8 --tp 8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vita.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
