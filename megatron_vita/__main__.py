"""`python -m megatron_vita` is the `megatron-vita` command."""
import sys

from megatron_vita.cli import main

sys.exit(main())
