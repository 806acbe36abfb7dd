"""PatchRegistry: lazy registration, stacking, conflicts, stale `from x import f` copies, removal.

Most tests patch a throwaway package (conftest.toy_pkg); one patches real megatron-core.
"""
import importlib.metadata
import itertools
import sys

import pytest

from mindspeed_patches import registry as reg
from mindspeed_patches.registry import (
    MegatronVersionError,
    MegatronVersionWarning,
    PatchConflictError,
    PatchError,
    PatchRegistry,
    PatchTargetError,
    check_megatron_core_version,
)


def new_compute(x):
    return ("new", x)


def other_compute(x):
    return ("other", x)


def tag_wrapper(fn):
    def inner(*args, **kwargs):
        return ("tag", fn(*args, **kwargs))
    return inner


def test_nothing_changes_until_apply(toy_pkg):
    r = PatchRegistry()
    original = toy_pkg.core.compute
    r.register_patch(f"{toy_pkg.name}.core.compute", new_compute)
    assert toy_pkg.core.compute is original
    r.apply_patches()
    assert toy_pkg.core.compute is new_compute
    assert r.is_applied(f"{toy_pkg.name}.core.compute")
    r.remove_patches()


def test_apply_then_remove_restores_every_original_exactly(toy_pkg):
    core = toy_pkg.core
    module_before = dict(vars(core))
    thing_before = dict(vars(core.Thing))
    sub_before = dict(vars(core.SubThing))

    def new_static(x):
        return ("new static", x)

    def sub_method(self, x):
        return ("sub", x)

    r = PatchRegistry()
    p = toy_pkg.name
    r.register_patch(f"{p}.core.compute", new_compute)
    r.register_patch(f"{p}.core.helper", tag_wrapper)
    r.register_patch(f"{p}.core.Thing.method", tag_wrapper)
    r.register_patch(f"{p}.core.Thing.static", new_static)
    r.register_patch(f"{p}.core.Thing.klass", tag_wrapper)
    r.register_patch(f"{p}.core.SubThing.method", sub_method)  # inherited: SubThing has no own `method`
    r.apply_patches()

    t, s = core.Thing(), core.SubThing()
    assert core.compute(1) == ("new", 1)
    assert core.helper(2) == ("tag", 20)
    assert t.method(3) == ("tag", ("method", 3))
    # Still a staticmethod / classmethod after patching: callable on the class and on instances.
    assert core.Thing.static(4) == ("new static", 4) and t.static(4) == ("new static", 4)
    assert isinstance(vars(core.Thing)["static"], staticmethod)
    assert core.SubThing.klass(5) == ("tag", ("SubThing", 5))
    assert s.method(6) == ("sub", 6)

    r.remove_patches()
    for before, owner in ((module_before, core), (thing_before, core.Thing), (sub_before, core.SubThing)):
        after = dict(vars(owner))
        assert after.keys() == before.keys()
        changed = [k for k in before if after[k] is not before[k]]
        assert changed == [], f"not restored on {owner}: {changed}"
    assert "method" not in vars(core.SubThing)
    assert s.method(6) == ("method", 6)
    assert core.Thing.klass(7) == ("Thing", 7)


def _wrapper(label):
    def make(fn):
        def inner(x):
            return f"{label}({fn(x)})"
        return inner
    make.__name__ = f"{label}_wrapper"
    return make


def _replacement(x):
    return "R"


@pytest.mark.parametrize("order", list(itertools.permutations(["R", "a", "b"])))
def test_wrappers_stack_in_registration_order_around_the_replacement(toy_pkg, order):
    r = PatchRegistry()
    target = f"{toy_pkg.name}.core.compute"
    wrappers = {"a": _wrapper("a"), "b": _wrapper("b")}
    for item in order:
        r.register_patch(target, _replacement if item == "R" else wrappers[item])
    r.apply_patches()
    first, second = [w for w in order if w != "R"]
    # The replacement is innermost whenever it was registered; the last wrapper is outermost.
    assert toy_pkg.core.compute(0) == f"{second}({first}(R))"
    r.remove_patches()
    assert toy_pkg.core.compute(0) == 1


def test_wrappers_without_replacement_wrap_the_original(toy_pkg):
    r = PatchRegistry()
    target = f"{toy_pkg.name}.core.compute"
    r.register_patch(target, _wrapper("a"))
    r.register_patch(target, _wrapper("b"))
    r.apply_patches()
    assert toy_pkg.core.compute(1) == "b(a(2))"
    r.remove_patches()


def test_decorator_suffix_is_a_wrapper_too(toy_pkg):
    def tag_decorator(fn):
        return lambda x: ("decorated", fn(x))

    r = PatchRegistry()
    r.register_patch(f"{toy_pkg.name}.core.compute", tag_decorator)
    r.apply_patches()
    assert toy_pkg.core.compute(1) == ("decorated", 2)
    r.remove_patches()


def test_second_replacement_is_an_error_naming_both_and_the_target(toy_pkg):
    r = PatchRegistry()
    target = f"{toy_pkg.name}.core.compute"
    r.register_patch(target, new_compute)
    r.register_patch(target, new_compute)  # the same function again is not a conflict
    with pytest.raises(PatchConflictError) as e:
        r.register_patch(target, other_compute)
    msg = str(e.value)
    assert target in msg and "new_compute" in msg and "other_compute" in msg and "force=True" in msg
    r.register_patch(target, other_compute, force=True)
    r.apply_patches()
    assert toy_pkg.core.compute(1) == ("other", 1)
    r.remove_patches()


def test_force_after_apply_recomposes_and_remove_still_restores(toy_pkg):
    r = PatchRegistry()
    target = f"{toy_pkg.name}.core.compute"
    original = toy_pkg.core.compute
    r.register_patch(target, new_compute)
    r.apply_patches()
    r.apply_patches()  # idempotent
    assert toy_pkg.user.compute is new_compute
    r.register_patch(target, tag_wrapper)
    r.register_patch(target, other_compute, force=True)
    r.apply_patches()
    assert toy_pkg.core.compute(1) == ("tag", ("other", 1))
    assert toy_pkg.user.compute is toy_pkg.core.compute
    r.remove_patches()
    assert toy_pkg.core.compute is original and toy_pkg.user.compute is original


def test_stale_from_imports_follow_apply_and_remove(toy_pkg):
    core, user = toy_pkg.core, toy_pkg.user
    original = core.compute
    assert user.compute is original
    r = PatchRegistry()
    r.register_patch(f"{toy_pkg.name}.core.compute", new_compute)
    r.apply_patches()
    assert user.compute is new_compute
    assert user.use(2) == ("new", 2)  # the module's own function sees the patch
    # An alias under another name is left alone (see the registry docstring).
    assert user.aliased is original
    late = toy_pkg.import_late()  # imported while patched: holds the patched function
    assert late.compute is new_compute
    r.remove_patches()
    assert core.compute is original and user.compute is original and late.compute is original
    assert user.use(2) == 3


def test_constants_are_patched_on_the_owner_only(toy_pkg):
    elsewhere = type(sys)("msp_constant_holder")
    elsewhere.LIMIT = 3  # same value (and, for small ints, the same object) but unrelated
    sys.modules[elsewhere.__name__] = elsewhere
    try:
        r = PatchRegistry()
        r.register_patch(f"{toy_pkg.name}.core.LIMIT", lambda: 99)
        r.apply_patches()
        assert toy_pkg.core.LIMIT() == 99 and elsewhere.LIMIT == 3
        r.remove_patches()
        assert toy_pkg.core.LIMIT == 3
    finally:
        del sys.modules[elsewhere.__name__]


def test_real_megatron_function_imported_by_name_elsewhere():
    from megatron.core import utils
    from megatron.core.transformer import attention, dot_product_attention

    original = utils.divide
    holders = [m for m in list(sys.modules.values())
               if isinstance(m, type(sys)) and m.__dict__.get("divide") is original]
    assert attention in holders and dot_product_attention in holders and len(holders) >= 3
    calls = []

    def count_wrapper(fn):
        def counted(a, b):
            calls.append((a, b))
            return fn(a, b)
        return counted

    r = PatchRegistry()
    r.register_patch("megatron.core.utils.divide", count_wrapper)
    try:
        r.apply_patches()
        patched = utils.divide
        assert patched is not original
        assert all(m.__dict__["divide"] is patched for m in holders)
        assert attention.divide(12, 4) == 3 and calls == [(12, 4)]
        with pytest.raises(AssertionError):  # still megatron's divide underneath
            attention.divide(5, 2)
    finally:
        r.remove_patches()
    assert utils.divide is original
    assert all(m.__dict__["divide"] is original for m in holders)


def test_real_megatron_method_patch_is_seen_through_reexports():
    import megatron.core.tensor_parallel as tp
    from megatron.core.tensor_parallel import layers

    original = layers.ColumnParallelLinear.forward

    def forward_wrapper(fn):
        def forward(self, *args, **kwargs):
            return fn(self, *args, **kwargs)
        return forward

    r = PatchRegistry()
    r.register_patch("megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward", forward_wrapper)
    r.apply_patches()
    try:
        assert tp.ColumnParallelLinear.forward.__name__ == "forward"
        assert tp.ColumnParallelLinear.forward is not original
    finally:
        r.remove_patches()
    assert layers.ColumnParallelLinear.forward is original


def test_missing_megatron_symbol_names_symbol_and_versions():
    installed = importlib.metadata.version("megatron-core")
    r = PatchRegistry()
    r.register_patch("megatron.core.utils.divide", tag_wrapper)  # valid, must not be applied
    r.register_patch("megatron.core.transformer.attention.Foo", new_compute)
    r.register_patch("megatron.core.no_such_module.Bar", new_compute)
    with pytest.raises(PatchTargetError) as e:
        r.apply_patches()
    msg = str(e.value)
    assert ("mindspeed_patches: cannot patch megatron.core.transformer.attention.Foo: no attribute 'Foo' "
            f"in megatron.core.transformer.attention (megatron-core {installed} installed; these patches "
            f"target {reg.EXPECTED_MEGATRON_CORE})") in msg
    assert "megatron.core.no_such_module.Bar" in msg and "'no_such_module'" in msg
    # Reported before anything was patched.
    assert not r.is_applied("megatron.core.utils.divide")
    from megatron.core import utils
    assert utils.divide.__name__ == "divide" and utils.divide(4, 2) == 2


def test_missing_method_on_a_class_names_the_class(toy_pkg):
    r = PatchRegistry()
    r.register_patch(f"{toy_pkg.name}.core.Thing.nope", new_compute)
    with pytest.raises(PatchTargetError, match=rf"no attribute 'nope' in {toy_pkg.name}\.core\.Thing"):
        r.apply_patches()


def test_module_that_fails_to_import_is_not_reported_as_missing(toy_pkg, tmp_path):
    (tmp_path / toy_pkg.name / "broken.py").write_text("import msp_definitely_not_installed\n")
    r = PatchRegistry()
    r.register_patch(f"{toy_pkg.name}.broken.fn", new_compute)
    with pytest.raises(ModuleNotFoundError, match="msp_definitely_not_installed"):
        r.apply_patches()


def test_version_mismatch_warns_or_raises(monkeypatch):
    installed = importlib.metadata.version("megatron-core")
    assert check_megatron_core_version(strict=True) == installed  # the pinned version passes
    monkeypatch.setattr(reg, "EXPECTED_MEGATRON_CORE", "0.99.0")
    monkeypatch.delenv(reg.STRICT_VERSION_ENV, raising=False)
    with pytest.warns(MegatronVersionWarning, match=rf"megatron-core {installed} is installed .* target megatron-core 0\.99\.0"):
        check_megatron_core_version()
    with pytest.raises(MegatronVersionError, match="0.99.0"):
        check_megatron_core_version(strict=True)
    monkeypatch.setenv(reg.STRICT_VERSION_ENV, "1")
    with pytest.raises(MegatronVersionError):
        check_megatron_core_version()


def test_create_dummy_makes_and_removes_a_missing_attribute(toy_pkg):
    target = f"{toy_pkg.name}.core.optional_kernel"
    without = PatchRegistry()
    without.register_patch(target, tag_wrapper)
    with pytest.raises(PatchTargetError, match="no attribute 'optional_kernel'"):
        without.apply_patches()
    r = PatchRegistry()
    r.register_patch(target, create_dummy=True)
    r.apply_patches()
    with pytest.raises(NotImplementedError, match=target):
        toy_pkg.core.optional_kernel(1)
    r.remove_patches()
    assert not hasattr(toy_pkg.core, "optional_kernel")


def test_create_dummy_makes_missing_modules_and_wraps_the_dummy(toy_pkg):
    root = f"{toy_pkg.name}_absent"
    r = PatchRegistry()
    r.register_patch(f"{root}.optimizers.FusedAdam", new_compute, create_dummy=True)
    r.register_patch(f"{toy_pkg.name}.core.Thing.fused", tag_wrapper, create_dummy=True)
    r.apply_patches()
    from_import = __import__(f"{root}.optimizers", fromlist=["FusedAdam"])
    assert from_import.FusedAdam(1) == ("new", 1)
    with pytest.raises(NotImplementedError):
        toy_pkg.core.Thing().fused()
    r.remove_patches()
    assert root not in sys.modules and f"{root}.optimizers" not in sys.modules
    assert "fused" not in vars(toy_pkg.core.Thing)


def test_registration_errors():
    r = PatchRegistry()
    with pytest.raises(ValueError, match="dotted path"):
        r.register_patch("nodots", new_compute)
    with pytest.raises(ValueError, match="needs a new function"):
        r.register_patch("a.b")
    with pytest.raises(ValueError, match="must be callable"):
        r.register_patch("a.b", 3)


def test_wrapper_returning_none_fails_and_rolls_back(toy_pkg):
    def broken_wrapper(fn):
        return None

    r = PatchRegistry()
    p = toy_pkg.name
    original_helper = toy_pkg.core.helper
    r.register_patch(f"{p}.core.helper", new_compute)
    r.register_patch(f"{p}.core.compute", broken_wrapper)
    with pytest.raises(PatchError, match="broken_wrapper.*returned None"):
        r.apply_patches()
    assert toy_pkg.core.helper is original_helper and toy_pkg.user.compute(1) == 2


def test_entries_list_every_function_with_its_target_kind_and_reason(toy_pkg):
    r = PatchRegistry()
    p = toy_pkg.name
    r.register_patch(f"{p}.core.compute", new_compute, reason="why new")
    r.register_patch(f"{p}.core.compute", tag_wrapper, reason="why tag")
    r.register_patch(f"{p}.core.compute", new_compute)  # idempotent: keeps its reason
    with pytest.raises(PatchConflictError):
        r.register_patch(f"{p}.core.compute", other_compute, reason="never registered")
    r.register_patch(f"{p}.core.optional_kernel", create_dummy=True, reason="absent here")
    with pytest.raises(ValueError, match="one line"):
        r.register_patch(f"{p}.core.helper", tag_wrapper, reason="two\nlines")
    assert r.registered() == [f"{p}.core.compute", f"{p}.core.optional_kernel"]
    r.apply_patches()
    try:
        assert [(e.target, e.function.rsplit(".", 1)[-1], e.kind, e.reason, e.applied) for e in r.entries()] == [
            (f"{p}.core.compute", "new_compute", "replacement", "why new", True),
            (f"{p}.core.compute", "tag_wrapper", "wrapper", "why tag", True),
            (f"{p}.core.optional_kernel", "placeholder", "placeholder", "absent here", True),
        ]
    finally:
        r.remove_patches()
    assert not any(e.applied for e in r.entries())
