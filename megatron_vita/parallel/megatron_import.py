"""How megatron-core is imported: its import-time `torch.compile` calls are deferred to first use.

megatron-core 0.12.1 decorates a few functions with `megatron.core.jit.jit_fuser`, which is
`torch.compile`, while its package imports (`megatron.core.transformer.utils.gelu_impl`,
`erf_gelu`, the bias-activation fusions). `torch.compile` compiles nothing until the function is
first called, but calling it imports torch._dynamo and torch._inductor: 5 s of CPU in every
process that imports megatron-core (measured on this 2-core machine: `import torch,
megatron.core` 9.5 s, 4.2 s with the deferral), although this stack never calls those functions
(its layer specs run plain ops; `models.common.specs.PLAIN_OPS`). Every training rank, verify
rank and CLI process pays it.

While `megatron.core` itself executes, `torch.compile` is replaced by a function that returns a
plain wrapper which calls `torch.compile` on its first call and the compiled function from then
on: megatron's behaviour is unchanged (compiled at first use), only the import is saved. The
original `torch.compile` is back as soon as the package has imported; megatron keeps the
deferring one as `jit_fuser`, which later imports (e.g. megatron.core.fusions) use the same way.
Modules (as opposed to functions) are compiled at once, as before.

`install()` (called by `import megatron_vita`) puts a meta-path finder first that does this for
the one import of `megatron.core`, then removes itself. Nothing is imported until megatron-core
is; if it already was, nothing happens.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Callable

from megatron_vita.import_hooks import WrappingLoader, find_spec_wrapped

_PACKAGE = "megatron.core"


def deferring(compile_fn: Callable) -> Callable:
    """A `torch.compile` that calls `compile_fn` on a function's first call instead of at once."""

    def compile_at_first_call(model=None, **options):
        if model is None:  # @torch.compile(mode=...): the options first, the function next
            return lambda fn: compile_at_first_call(fn, **options)
        if not inspect.isfunction(model):
            return compile_fn(model, **options)
        compiled = None
        lock = threading.Lock()

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                with lock:
                    if compiled is None:
                        compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    compile_at_first_call.deferring = compile_fn
    return compile_at_first_call


class _DeferredCompileFinder:
    """Finds `megatron.core` through the other finders and runs its import with the deferral."""

    def find_spec(self, name, path, target=None):
        if name != _PACKAGE:
            return None
        return find_spec_wrapped(self, name, path, target, _DeferringLoader)

    def invalidate_caches(self) -> None:
        pass


class _DeferringLoader(WrappingLoader):
    def execute(self, module) -> None:
        import torch

        _remove_finder()
        real = torch.compile
        torch.compile = deferring(real)
        try:
            self.loader.exec_module(module)
        finally:
            # Something imported meanwhile may have replaced torch.compile itself (an adapter):
            # only our own stand-in is taken back.
            if getattr(torch.compile, "deferring", None) is real:
                torch.compile = real


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _DeferredCompileFinder)]


def install() -> None:
    """Defer megatron-core's import-time torch.compile calls, unless megatron-core is imported."""
    if _PACKAGE in sys.modules or any(isinstance(f, _DeferredCompileFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferredCompileFinder())
