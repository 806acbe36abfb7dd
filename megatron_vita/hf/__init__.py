"""Hugging Face side of Long-VITA: transformers classes for the released checkpoint layout.

Owns the registration of model_type "long_vita" with transformers' Auto classes, so released
checkpoints load with `AutoModelForCausalLM.from_pretrained(dir)` / `AutoConfig.from_pretrained(dir)`
and no remote code. `import megatron_vita` calls `register_when_transformers_loads()`: if
transformers' Auto classes are imported already, the config class is registered at once; else a
`sys.meta_path` finder registers it as soon as the Auto classes are imported. So a process that
never uses transformers (`megatron-vita --help`, most of the CLI's checks) does not import it.
The model classes are registered when the first LongVITAConfig is made (every AutoModel lookup
starts from one): a process that only loads a tokenizer (AutoTokenizer imports the Auto
classes) never imports transformers' modeling code, 3.5 s of CPU in each launcher, rank and
dataloader worker of a training run. Nothing here imports megatron-core.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, List, Tuple

from megatron_vita.import_hooks import WrappingLoader, find_spec_wrapped

# AutoTokenizer imports both, so neither may import the model classes.
AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")

_models_registered = False


def register_auto_classes() -> None:
    """Register LongVITAConfig / LongVITAModel / LongVITAForCausalLM with the Auto classes now.

    Idempotent.
    """
    register_config_class()
    register_model_classes()


def register_config_class() -> None:
    """Register LongVITAConfig with AutoConfig (imports no modeling code)."""
    from transformers import AutoConfig

    from megatron_vita.hf.configuration import LongVITAConfig

    AutoConfig.register(LongVITAConfig.model_type, LongVITAConfig, exist_ok=True)


def register_model_classes() -> None:
    """Register LongVITAModel / LongVITAForCausalLM with AutoModel / AutoModelForCausalLM.

    Called by every new LongVITAConfig; it imports the modeling code once, the first time.
    """
    global _models_registered
    if _models_registered:
        return
    # Set first: the modeling import below may itself make a LongVITAConfig.
    _models_registered = True
    from transformers import AutoModel, AutoModelForCausalLM

    from megatron_vita.hf.configuration import LongVITAConfig
    from megatron_vita.hf.modeling import LongVITAForCausalLM, LongVITAModel

    AutoModel.register(LongVITAConfig, LongVITAModel, exist_ok=True)
    AutoModelForCausalLM.register(LongVITAConfig, LongVITAForCausalLM, exist_ok=True)


def register_when_transformers_loads() -> None:
    """Register the config class now if transformers' Auto classes are imported, else as soon as
    one of them is.

    Idempotent: a watcher installed by an earlier call is left to do its work.
    """
    if any(name in sys.modules for name in AUTO_MODULES):
        register_config_class()
    elif not any(isinstance(f, _AutoModuleWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleWatcher(AUTO_MODULES, register_config_class))


class _AutoModuleWatcher:
    """A meta-path finder that runs `register` once one of the `triggers` modules has loaded.

    It cannot run at the moment the Auto module finishes executing: that module is often imported
    half-way through another one (transformers' `modeling_layers`, imported by `modeling_qwen2`,
    which `megatron_vita.hf.modeling` itself imports), and registering needs those modules whole.
    So the watcher wraps the loader of every transformers and megatron_vita module, keeps the
    stack of those being executed in this thread, and runs what is due when the stack is empty:
    when the outermost such import returns. It removes itself then.
    """

    PACKAGES = ("transformers", "megatron_vita")

    def __init__(self, triggers: Tuple[str, ...], register: Callable[[], None]):
        self.triggers, self.register = triggers, register
        self.due = False
        self.lock = threading.Lock()
        self.local = threading.local()

    def executing(self) -> List[str]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] not in self.PACKAGES:
            return None
        return find_spec_wrapped(self, name, path, target, lambda loader: _WatchedLoader(loader, self))

    def loaded(self, name: str) -> None:
        with self.lock:
            self.due = self.due or name in self.triggers
            if self.executing() or not self.due or self not in sys.meta_path:
                return
            sys.meta_path.remove(self)
        self.register()

    def invalidate_caches(self) -> None:
        pass


class _WatchedLoader(WrappingLoader):
    """Tells the watcher which module is executing and when it has executed."""

    def __init__(self, loader, watcher: _AutoModuleWatcher):
        super().__init__(loader)
        self.watcher = watcher

    def execute(self, module) -> None:
        name = module.__spec__.name
        stack = self.watcher.executing()
        stack.append(name)
        try:
            self.loader.exec_module(module)
        finally:
            stack.pop()
        self.watcher.loaded(name)
