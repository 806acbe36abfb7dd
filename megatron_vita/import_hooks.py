"""Meta-path plumbing shared by the import hooks that `import megatron_vita` installs.

Two hooks watch imports without importing anything themselves: `megatron_vita.hf` registers the
Long-VITA config with transformers' Auto classes once they load, and
`megatron_vita.parallel.megatron_import` defers megatron-core's import-time `torch.compile`
calls. Each finds a module through the other finders on `sys.meta_path` and runs that module's
execution through a loader of its own (`find_spec_wrapped`, `WrappingLoader`). The module keeps
its real loader as `__loader__` / `__spec__.loader` (source lookups, resources), so nothing of
the wrapper outlives the import. Imports nothing but `sys`.
"""
from __future__ import annotations

import sys
from typing import Callable


def find_spec_wrapped(hook, name: str, path, target, wrap: Callable):
    """`name`'s spec as the finders after `hook` find it, its loader replaced by `wrap(loader)`
    (a loader without `exec_module` is left alone); None if no finder has it."""
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if finder is hook or find is None:
            continue
        spec = find(name, path, target)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = wrap(spec.loader)
            return spec
    return None


class WrappingLoader:
    """Delegates to the real loader; a subclass runs the module's execution its way (`execute`)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.execute(module)

    def execute(self, module) -> None:
        self.loader.exec_module(module)

    def __getattr__(self, attr):
        return getattr(self.loader, attr)
