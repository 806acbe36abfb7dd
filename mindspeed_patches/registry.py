"""The patch registry: record patches lazily, apply them all at once, remove them exactly.

A patch names a target by its dotted path, `"pkg.module.Attr"` or `"pkg.module.Class.method"`,
and a new callable. What the callable's name says decides what it does:

* a name ending in `wrapper` or `decorator` is a decorator: it receives the current target
  and returns the function to use. Wrappers stack in registration order, the last registered
  outermost, around the replacement when there is one, else around the original;
* anything else replaces the target. A second replacement of the same target is an error
  (it would silently drop the first feature's work) unless registered with `force=True`.

Nothing changes until `apply_patches()`. Applying sets the attribute on its owner and then
rewrites stale copies: a module that ran `from pkg.module import f` before the patch holds
its own reference to the original `f`, so every loaded module whose attribute of the same
name IS the original object gets the patched one (and the original back on
`remove_patches()`). Aliases under another name (`import f as g`) are deliberately left
alone: holding the original under a different name is how other patchers keep a handle
on it, and redirecting that handle would make them call themselves.

Each registration may carry a one-line `reason`; `entries()` lists every registered function
with its target and reason, so the registry itself says everything that was changed and why.

The targets were written for megatron-core `EXPECTED_MEGATRON_CORE`. A target that does not
exist fails before anything is patched, naming the missing symbol and both versions,
instead of the obscure ImportError an upgrade of megatron-core otherwise produces.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

EXPECTED_MEGATRON_CORE = "0.12.1"
# "1" turns a megatron-core version mismatch from a warning into an error.
STRICT_VERSION_ENV = "MINDSPEED_PATCHES_STRICT_VERSION"


class PatchError(RuntimeError):
    """A patch cannot be registered, applied or removed; the message says which and why."""


class PatchConflictError(PatchError):
    """Two features replace the same target."""


class PatchTargetError(PatchError):
    """A target module or attribute does not exist in the installed packages."""


class MegatronVersionError(PatchError):
    """The installed megatron-core is not the one the patches were written for (strict mode)."""


class MegatronVersionWarning(UserWarning):
    """The installed megatron-core is not the one the patches were written for."""


def installed_megatron_core_version() -> Optional[str]:
    """The installed megatron-core version, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> Tuple[int, ...]:
    # Compare major.minor.patch only: local builds ("0.12.1+npu") carry the same API.
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split("."))[:3] if match else ()


def version_note() -> str:
    """'megatron-core X installed; these patches target Y', for error messages."""
    installed = installed_megatron_core_version() or "no version of megatron-core"
    return f"megatron-core {installed} installed; these patches target {EXPECTED_MEGATRON_CORE}"


def check_megatron_core_version(strict: Optional[bool] = None) -> Optional[str]:
    """Compare the installed megatron-core with `EXPECTED_MEGATRON_CORE`; return the installed one.

    A missing megatron-core is always an error. A different version warns, or raises
    `MegatronVersionError` when `strict` (default: `$MINDSPEED_PATCHES_STRICT_VERSION == "1"`).
    """
    if strict is None:
        strict = os.environ.get(STRICT_VERSION_ENV, "0") == "1"
    installed = installed_megatron_core_version()
    if installed is None:
        raise MegatronVersionError(
            f"mindspeed_patches: megatron-core is not installed; these patches target megatron-core "
            f"{EXPECTED_MEGATRON_CORE} (pip install megatron-core=={EXPECTED_MEGATRON_CORE})")
    if _release(installed) != _release(EXPECTED_MEGATRON_CORE):
        message = (
            f"mindspeed_patches: megatron-core {installed} is installed but these patches (and the "
            f"MindSpeed branch they sit on) target megatron-core {EXPECTED_MEGATRON_CORE}; patched "
            f"functions may be missing or have changed signatures. Install "
            f"megatron-core=={EXPECTED_MEGATRON_CORE}"
            + ("." if strict else f", or set {STRICT_VERSION_ENV}=1 to make this an error."))
        if strict:
            raise MegatronVersionError(message)
        warnings.warn(message, MegatronVersionWarning, stacklevel=2)
    return installed


def _describe(obj: Any) -> str:
    """A readable name for a function, class or module in messages."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qualname is None:
        return repr(obj)
    return f"{module}.{qualname}" if module else qualname


def is_wrapper(fn: Callable) -> bool:
    """A decorator-style patch: its name ends in 'wrapper' or 'decorator'."""
    return getattr(fn, "__name__", "").endswith(("wrapper", "decorator"))


@dataclass
class _Applied:
    """What one applied patch changed, so that removing it restores the exact original."""

    owner: Any
    attr: str
    existed: bool  # False when create_dummy made the target
    had_own: bool  # the attribute was in the owner's own __dict__ (not inherited, not missing)
    original_raw: Any  # owner.__dict__[attr] when had_own: keeps staticmethod/classmethod objects
    original: Any = None  # the original as wrappers see it (descriptors unwrapped)
    kind: Optional[type] = None  # staticmethod / classmethod when the original was one
    value: Any = None  # the applied function (before re-wrapping in `kind`)
    created_modules: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class PatchEntry:
    """One registered function: what it patches, how, why, and whether it is applied now."""

    target: str
    function: str  # the replacement's or wrapper's qualified name ("placeholder" for create_dummy)
    kind: str  # "replacement" | "wrapper" | "placeholder"
    reason: str
    applied: bool


@dataclass
class _Patch:
    target: str
    replacement: Optional[Callable] = None
    wrappers: List[Callable] = field(default_factory=list)
    create_dummy: bool = False
    reasons: Dict[Any, str] = field(default_factory=dict)  # function (None: the placeholder) -> reason
    applied: Optional[_Applied] = None
    stale: bool = False  # registered to since it was applied: recompose on the next apply


def _dummy(target: str) -> Callable:
    def dummy(*args, **kwargs):
        raise NotImplementedError(
            f"{target} does not exist in the installed packages; mindspeed_patches created a "
            "placeholder for it (create_dummy=True) and no feature replaced it")

    dummy.__name__ = target.rsplit(".", 1)[-1]
    dummy.__qualname__ = target
    return dummy


def _lookup_raw(owner: Any, attr: str) -> Tuple[Any, bool]:
    """(the stored attribute, whether the owner itself stores it) without invoking descriptors."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in klass.__dict__:
                return klass.__dict__[attr], klass is owner
    namespace = getattr(owner, "__dict__", None)
    if namespace is not None and attr in namespace:
        return namespace[attr], True
    return getattr(owner, attr), False


def _unwrap_descriptor(raw: Any) -> Tuple[Any, Optional[type]]:
    """(function, descriptor type) for staticmethod/classmethod, else (raw, None)."""
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__, type(raw)
    return raw, None


class PatchRegistry:
    """Lazy registry of patches; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._patches: Dict[str, _Patch] = {}
        self._order: List[str] = []  # application order, for removal in reverse
        self._foreign: Dict[str, str] = {}  # target -> who else patched it (MindSpeed), see declare_foreign

    # -- other patchers -----------------------------------------------------------------

    def declare_foreign(self, targets: Dict[str, str]) -> None:
        """Record symbols another patcher (MindSpeed's own adaptor) already patched: target -> who.

        Applying a patch of one of them fails (one line per target, before anything changes):
        stacking on, or replacing, another patcher's work is how a symbol gets patched twice."""
        self._foreign.update(targets)

    def foreign(self) -> Dict[str, str]:
        return dict(self._foreign)

    # -- registration -------------------------------------------------------------------

    def register_patch(self, target: str, new: Optional[Callable] = None, force: bool = False,
                       create_dummy: bool = False, reason: str = "") -> None:
        """Record a patch of `target`; nothing changes until `apply_patches()`.

        Registering the same wrapper or replacement object twice is a no-op, so features may
        register idempotently. `reason`: one line saying why (listed by `entries()`).
        """
        parts = target.split(".") if isinstance(target, str) else []
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise ValueError(f"mindspeed_patches: patch target {target!r} must be a dotted path "
                             "'pkg.module.Attr' or 'pkg.module.Class.method'")
        if new is None and not create_dummy:
            raise ValueError(f"mindspeed_patches: register_patch({target!r}) needs a new function "
                             "unless create_dummy=True")
        if new is not None and not callable(new):
            raise ValueError(f"mindspeed_patches: the patch for {target} must be callable, got {new!r}")
        if "\n" in reason:
            raise ValueError(f"mindspeed_patches: the reason for patching {target} must be one line")
        patch = self._patches.setdefault(target, _Patch(target))
        patch.create_dummy = patch.create_dummy or create_dummy
        if new is not None and is_wrapper(new):
            if new not in patch.wrappers:
                patch.wrappers.append(new)
                patch.stale = True
        elif new is not None:
            if patch.replacement is not None and patch.replacement is not new and not force:
                raise PatchConflictError(
                    f"mindspeed_patches: {target} is replaced twice: by {_describe(patch.replacement)} and by "
                    f"{_describe(new)}. Only one replacement per target; make one of them a wrapper (a "
                    "function named '*_wrapper' that receives the current target) or pass force=True")
            if patch.replacement is not new:
                patch.replacement = new
                patch.stale = True
        if reason or new not in patch.reasons:
            patch.reasons[new] = reason

    def registered(self) -> List[str]:
        """Registered targets, in registration order."""
        return list(self._patches)

    def is_applied(self, target: str) -> bool:
        patch = self._patches.get(target)
        return bool(patch and patch.applied)

    def describe(self) -> str:
        """One line per target: its replacement, its wrappers (innermost first), whether applied."""
        lines = []
        for patch in self._patches.values():
            wrappers = ", ".join(_describe(w) for w in patch.wrappers) or "-"
            replacement = _describe(patch.replacement) if patch.replacement else "original"
            state = "applied" if patch.applied else "pending"
            lines.append(f"{patch.target}: {replacement}; wrappers: {wrappers} ({state})")
        return "\n".join(lines)

    def entries(self) -> List[PatchEntry]:
        """Every registered function, by target in registration order, innermost first."""
        out = []
        for patch in self._patches.values():
            functions = [("replacement", patch.replacement)] if patch.replacement is not None else []
            if patch.replacement is None and patch.create_dummy:
                functions.append(("placeholder", None))
            functions += [("wrapper", w) for w in patch.wrappers]
            for kind, fn in functions:
                name = "placeholder" if fn is None else _describe(fn)
                out.append(PatchEntry(patch.target, name, kind, patch.reasons.get(fn, ""), bool(patch.applied)))
        return out

    # -- apply / remove -----------------------------------------------------------------

    def apply_patches(self) -> None:
        """Apply every registered patch not yet applied (and recompose re-registered ones).

        All missing targets are reported together before anything changes; if applying fails
        half-way, the patches applied by this call are rolled back.
        """
        pending = [p for p in self._patches.values() if p.applied is None or p.stale]
        twice = [f"mindspeed_patches: {p.target} is already patched by {self._foreign[p.target]}; megatron-vita "
                 f"would patch it a second time ({self._why(p)})" for p in pending if p.target in self._foreign]
        if twice:
            raise PatchConflictError("\n".join(twice))
        missing = []
        for patch in pending:
            if patch.applied is None and not patch.create_dummy:
                try:
                    self._resolve(patch.target, create=False)
                except PatchTargetError as e:
                    missing.append(str(e))
        if missing:
            raise PatchTargetError("\n".join(missing))
        newly_applied: List[_Patch] = []
        try:
            for patch in pending:
                if self._apply_one(patch):
                    newly_applied.append(patch)
        except BaseException:
            for patch in reversed(newly_applied):
                self._remove_one(patch)
            raise

    def remove_patches(self) -> None:
        """Restore every original (and every stale copy of it); keep the registrations."""
        for target in reversed(list(self._order)):
            self._remove_one(self._patches[target])

    def clear(self) -> None:
        """Remove all patches and forget the registrations (and the foreign targets)."""
        self.remove_patches()
        self._patches.clear()
        self._foreign.clear()

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _why(patch: _Patch) -> str:
        names = [_describe(f) for f in ([patch.replacement] if patch.replacement else []) + patch.wrappers]
        reason = next((r for r in patch.reasons.values() if r), "")
        return ", ".join(names) + (f": {reason}" if reason else "")

    def _resolve(self, target: str, create: bool) -> Tuple[Any, str, List[str]]:
        """(owner, attribute name, dummy modules created) for `target`.

        The longest importable prefix is the module; the rest are attributes. A module that
        exists but fails to import raises its own error (it is not a missing target).
        """
        parts = target.split(".")
        obj, start = None, 0
        for i in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:i])
            try:
                obj, start = importlib.import_module(name), i
                break
            except ModuleNotFoundError as e:
                if e.name and (name == e.name or name.startswith(e.name + ".")):
                    continue
                raise
        created: List[str] = []
        if obj is None:
            if not create:
                raise self._missing(target, f"no module named {parts[0]!r}")
            obj, start = self._dummy_module(parts[0], None, created), 1
        for part in parts[start:-1]:
            if hasattr(obj, part):
                obj = getattr(obj, part)
            elif create and isinstance(obj, types.ModuleType):
                obj = self._dummy_module(part, obj, created)
            elif isinstance(obj, types.ModuleType):
                raise self._missing(target, f"no module or attribute {part!r} in {obj.__name__}")
            else:
                raise self._missing(target, f"no attribute {part!r} in {_describe(obj)}")
        attr = parts[-1]
        if not create and not hasattr(obj, attr):
            raise self._missing(target, f"no attribute {attr!r} in {_describe(obj)}")
        return obj, attr, created

    @staticmethod
    def _missing(target: str, why: str) -> PatchTargetError:
        note = f" ({version_note()})" if target.split(".")[0] == "megatron" else ""
        return PatchTargetError(f"mindspeed_patches: cannot patch {target}: {why}{note}")

    @staticmethod
    def _dummy_module(name: str, parent: Optional[types.ModuleType], created: List[str]) -> types.ModuleType:
        fullname = f"{parent.__name__}.{name}" if parent is not None else name
        module = types.ModuleType(fullname, "placeholder created by mindspeed_patches (create_dummy=True)")
        sys.modules[fullname] = module
        if parent is not None:
            setattr(parent, name, module)
        created.append(fullname)
        return module

    def _compose(self, patch: _Patch, original: Any) -> Any:
        value = original if patch.replacement is None else _unwrap_descriptor(patch.replacement)[0]
        for wrapper in patch.wrappers:
            value = wrapper(value)
            if value is None:
                raise PatchError(f"mindspeed_patches: wrapper {_describe(wrapper)} for {patch.target} "
                                 "returned None; a wrapper must return the function to use")
        return value

    def _apply_one(self, patch: _Patch) -> bool:
        """Apply (or recompose) one patch; True when it was not applied before."""
        applied = patch.applied
        first = applied is None
        if first:
            owner, attr, created = self._resolve(patch.target, create=patch.create_dummy)
            existed = hasattr(owner, attr)
            raw, had_own = _lookup_raw(owner, attr) if existed else (None, False)
            applied = _Applied(owner, attr, existed, had_own, raw if had_own else None,
                               created_modules=created)
            # On a class, staticmethod/classmethod are unwrapped so that wrappers and
            # replacements see the plain function; the result goes back in the same descriptor.
            applied.original, applied.kind = (
                _unwrap_descriptor(raw) if isinstance(owner, type) else (raw, None))
            previous = applied.original
        else:
            previous = applied.value
        value = self._compose(patch, applied.original if applied.existed else _dummy(patch.target))
        raw_value = applied.kind(value) if applied.kind is not None else value
        setattr(applied.owner, applied.attr, raw_value)
        applied.value = value
        patch.applied, patch.stale = applied, False
        if first:
            self._order.append(patch.target)
        if isinstance(applied.owner, types.ModuleType) and applied.existed:
            _redirect_copies(applied.attr, previous, value)
        return first

    def _remove_one(self, patch: _Patch) -> None:
        applied = patch.applied
        if applied is None:
            return
        if applied.had_own:
            setattr(applied.owner, applied.attr, applied.original_raw)
        elif applied.attr in getattr(applied.owner, "__dict__", {}):
            # Inherited or created: deleting our own entry exposes the original again.
            delattr(applied.owner, applied.attr)
        if isinstance(applied.owner, types.ModuleType):
            if applied.existed:
                _redirect_copies(applied.attr, applied.value, applied.original)
            else:
                _drop_copies(applied.attr, applied.value)
        for fullname in reversed(applied.created_modules):
            module = sys.modules.pop(fullname, None)
            parent_name, _, name = fullname.rpartition(".")
            parent = sys.modules.get(parent_name)
            if parent is not None and getattr(parent, name, None) is module:
                delattr(parent, name)
        patch.applied, patch.stale = None, False
        self._order.remove(patch.target)


def _loaded_module_dicts():
    for module in list(sys.modules.values()):
        # __dict__ directly: getattr on lazy modules (transformers) would import their contents.
        if isinstance(module, types.ModuleType):
            yield module.__dict__


def _redirect_copies(name: str, old: Any, new: Any) -> None:
    """Every loaded module whose attribute `name` IS `old` gets `new` (fixes `from x import f`)."""
    if old is new or not callable(old):
        # Constants are not chased: identity of small ints/None/True is shared by unrelated code.
        return
    for namespace in _loaded_module_dicts():
        if namespace.get(name) is old:
            namespace[name] = new


def _drop_copies(name: str, value: Any) -> None:
    """Remove copies of a created (dummy) target that modules imported while it existed."""
    for namespace in _loaded_module_dicts():
        if namespace.get(name) is value:
            del namespace[name]


REGISTRY = PatchRegistry()
register_patch = REGISTRY.register_patch
apply_patches = REGISTRY.apply_patches
remove_patches = REGISTRY.remove_patches
