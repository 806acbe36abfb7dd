"""`python -m megatron_vita` is the `megatron-vita` command."""
import sys

from megatron_vita.cli import console_main

sys.exit(console_main())
