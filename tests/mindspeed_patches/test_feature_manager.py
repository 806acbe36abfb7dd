"""Feature classes through FeatureManager with a real argparse parser, and apply_for_npu.

The features below are TEST FIXTURES (they patch the throwaway toy package), not NPU features.
"""
import argparse
import sys

import pytest

import mindspeed_patches
from mindspeed_patches import registry as reg
from mindspeed_patches.features import FEATURES, Feature, FeatureArgumentError, FeatureManager
from mindspeed_patches.registry import MegatronVersionError, PatchError, PatchRegistry

TOY_TARGET = {}  # the toy package's name, set by the `toy_target` fixture


class ToyScaleFeature(Feature):
    """TEST FIXTURE: multiplies toy `core.compute` results by --toy-scale-factor."""

    name = "toy-scale"
    help = "test fixture"

    def register_args(self, parser):
        super().register_args(parser)
        parser.add_argument("--toy-scale-factor", type=int, default=2)

    def validate_args(self, args):
        if args.toy_scale_factor < 1:
            raise ValueError(f"--toy-scale-factor must be >= 1, got {args.toy_scale_factor}")

    def register_patches(self, registry, args):
        factor = args.toy_scale_factor

        def scale_wrapper(fn):
            return lambda x: fn(x) * factor

        registry.register_patch(f"{TOY_TARGET['pkg']}.core.compute", scale_wrapper)


class ToyShiftFeature(Feature):
    """TEST FIXTURE: needs --toy-scale, excludes --toy-exclusive; adds 100 outside the scaling."""

    name = "toy-shift"
    requires = ("toy-scale",)
    incompatible_with = ("toy-exclusive",)

    def register_patches(self, registry, args):
        def shift_wrapper(fn):
            return lambda x: fn(x) + 100

        registry.register_patch(f"{TOY_TARGET['pkg']}.core.compute", shift_wrapper)


class ToyExclusiveFeature(Feature):
    """TEST FIXTURE: a switch with no patches."""

    name = "toy-exclusive"


TOY_FEATURES = [ToyScaleFeature, ToyShiftFeature, ToyExclusiveFeature]


@pytest.fixture
def toy_target(toy_pkg):
    TOY_TARGET["pkg"] = toy_pkg.name
    yield toy_pkg
    TOY_TARGET.clear()


def test_features_flow_through_a_parser(toy_target):
    manager = FeatureManager(TOY_FEATURES)
    parser = argparse.ArgumentParser(prog="train")
    parser.add_argument("--lr", type=float)  # the host command's own flags stay untouched
    manager.add_arguments(parser)
    assert FeatureManager.GROUP_TITLE in parser.format_help()
    args = parser.parse_args(["--lr", "0.1", "--toy-scale", "--toy-scale-factor", "3", "--toy-shift"])
    manager.validate(args)
    registry = PatchRegistry()
    assert manager.register_patches(registry, args) == ["toy-scale", "toy-shift"]
    registry.apply_patches()
    try:
        # compute(x) = x + 1; scale (registered first) inside shift.
        assert toy_target.core.compute(1) == (1 + 1) * 3 + 100
        assert toy_target.user.compute is toy_target.core.compute
    finally:
        registry.remove_patches()
    assert toy_target.core.compute(1) == 2


def test_disabled_features_register_nothing(toy_target):
    manager = FeatureManager(TOY_FEATURES)
    parser = argparse.ArgumentParser()
    manager.add_arguments(parser)
    registry = PatchRegistry()
    assert manager.register_patches(registry, parser.parse_args([])) == []
    assert registry.registered() == []


@pytest.mark.parametrize("argv, expected", [
    (["--toy-scale", "--toy-scale-factor", "0"], ["--toy-scale: --toy-scale-factor must be >= 1, got 0"]),
    (["--toy-shift"], ["--toy-shift requires --toy-scale"]),
    (["--toy-scale", "--toy-shift", "--toy-exclusive"], ["--toy-shift cannot be combined with --toy-exclusive"]),
    (["--toy-shift", "--toy-exclusive", "--toy-scale-factor", "0"],
     ["--toy-shift requires --toy-scale", "--toy-shift cannot be combined with --toy-exclusive"]),
])
def test_validation_errors_name_the_flags(argv, expected):
    manager = FeatureManager(TOY_FEATURES)
    args = manager.parse(argv)
    with pytest.raises(FeatureArgumentError) as e:
        manager.validate(args)
    for line in expected:
        assert line in str(e.value)
    # A disabled feature's option values are not its business: no --toy-scale-factor complaint here.
    if "--toy-scale" not in argv:
        assert "toy-scale-factor" not in str(e.value)


def test_manager_rejects_bad_feature_classes():
    class Unnamed(Feature):
        pass

    class Dashed(Feature):
        name = "--toy-scale"

    class Twin(Feature):
        name = "toy-scale"

    with pytest.raises(ValueError, match="Unnamed"):
        FeatureManager([Unnamed])
    with pytest.raises(ValueError, match="without '--'"):
        FeatureManager([Dashed])
    with pytest.raises(ValueError, match="ToyScaleFeature and .*Twin both claim --toy-scale"):
        FeatureManager([ToyScaleFeature, Twin])
    with pytest.raises(TypeError, match="not a Feature subclass"):
        FeatureManager([object])
    parser = argparse.ArgumentParser()
    parser.add_argument("--toy-scale")
    with pytest.raises(ValueError, match="toy-scale cannot add its flags"):
        FeatureManager([ToyScaleFeature]).add_arguments(parser)


def test_complete_args_fills_only_missing_defaults():
    args = argparse.Namespace(toy_scale=True)
    FeatureManager(TOY_FEATURES).complete_args(args)
    assert args.toy_scale is True and args.toy_scale_factor == 2 and args.toy_shift is False


@pytest.fixture
def clean_adaptor():
    mindspeed_patches.remove_all()
    yield
    mindspeed_patches.remove_all()


def test_apply_for_npu_runs_features_once_and_remove_all_restores(toy_target, clean_adaptor):
    args = argparse.Namespace(toy_scale=True, toy_scale_factor=5)  # toy_shift missing: defaults off
    assert mindspeed_patches.apply_for_npu(args, features=TOY_FEATURES, use_mindspeed=False) == ["toy-scale"]
    assert toy_target.core.compute(1) == 10
    # Idempotent: a second call neither re-validates nor wraps twice.
    assert mindspeed_patches.apply_for_npu(args, features=TOY_FEATURES) == ["toy-scale"]
    assert toy_target.core.compute(1) == 10 and mindspeed_patches.is_applied()
    mindspeed_patches.remove_all()
    assert toy_target.core.compute(1) == 2 and not mindspeed_patches.is_applied()
    assert mindspeed_patches.REGISTRY.registered() == []


def test_apply_for_npu_reads_sys_argv_without_args(toy_target, clean_adaptor, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "1e-4", "--toy-scale", "--toy-scale-factor", "4"])
    assert mindspeed_patches.apply_for_npu(features=TOY_FEATURES, use_mindspeed=False) == ["toy-scale"]
    assert toy_target.core.compute(0) == 4


def test_shipped_features_are_valid_off_by_default_and_fit_the_train_command(clean_adaptor):
    from megatron_vita.training import cli as train_cli

    manager = FeatureManager(FEATURES)  # Feature subclasses, well-formed and unique flags
    defaults = manager.parse([])
    assert not any(f.is_enabled(defaults) for f in manager.features)
    # On NPU the feature flags arrive on the train command's own command line: the train parser adds
    # them itself (config.features.add_feature_arguments), so none clashes with its other flags.
    parser = argparse.ArgumentParser(prog="train")
    train_cli.add_arguments(parser)
    assert all(f.flag in parser._option_string_actions for f in manager.features)
    # Without feature flags nothing is enabled, registered or patched.
    assert mindspeed_patches.apply_for_npu(argparse.Namespace(), use_mindspeed=False) == []
    assert mindspeed_patches.REGISTRY.registered() == []


@pytest.fixture
def shipped_toy_features():
    """The toy features appended to the shipped list in place (as a new NPU feature would be), then removed."""
    shipped = mindspeed_patches.FEATURES
    saved = list(shipped)
    shipped.extend(TOY_FEATURES)
    yield
    shipped[:] = saved


def test_shipped_feature_list_is_what_the_adaptor_runs(toy_target, clean_adaptor, shipped_toy_features, monkeypatch):
    # add_arguments without `features` offers the shipped features' flags ...
    parser = argparse.ArgumentParser()
    mindspeed_patches.add_arguments(parser)
    assert parser.parse_args(["--toy-scale", "--toy-scale-factor", "3"]).toy_scale_factor == 3
    # ... and apply_for_npu without `features` (as platform.activate("npu") calls it) validates them,
    with pytest.raises(FeatureArgumentError, match="--toy-shift requires --toy-scale"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(toy_shift=True), use_mindspeed=False)
    assert not mindspeed_patches.is_applied() and toy_target.core.compute(1) == 2
    # applies the enabled ones, here from sys.argv as under torchrun.
    monkeypatch.setattr(sys, "argv", ["pretrain_vita.py", "--toy-scale", "--toy-scale-factor", "3", "--toy-shift"])
    assert mindspeed_patches.apply_for_npu(use_mindspeed=False) == ["toy-scale", "toy-shift"]
    assert toy_target.core.compute(1) == (1 + 1) * 3 + 100


def test_apply_for_npu_strict_version_mismatch_applies_nothing(toy_target, clean_adaptor, monkeypatch):
    monkeypatch.setattr(reg, "EXPECTED_MEGATRON_CORE", "0.99.0")
    with pytest.raises(MegatronVersionError, match="0.99.0"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(toy_scale=True), features=TOY_FEATURES,
                                        strict_version=True, use_mindspeed=False)
    assert not mindspeed_patches.is_applied() and toy_target.core.compute(1) == 2


def test_apply_for_npu_invalid_flags_fail_before_patching(toy_target, clean_adaptor):
    with pytest.raises(FeatureArgumentError, match="--toy-shift requires --toy-scale"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(toy_shift=True), features=TOY_FEATURES,
                                        use_mindspeed=False)
    assert not mindspeed_patches.is_applied() and toy_target.core.compute(1) == 2


@pytest.fixture
def fake_mindspeed(tmp_path, monkeypatch):
    """A stand-in `mindspeed` package on sys.path (real MindSpeed needs an NPU); returns its dir."""
    pkg = tmp_path / "mindspeed"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        del sys.modules[name]


def test_apply_for_npu_imports_mindspeed_adaptor_when_installed(fake_mindspeed, clean_adaptor):
    (fake_mindspeed / "megatron_adaptor.py").write_text("import sys\nsys.modules[__name__].LOADED = True\n")
    mindspeed_patches.apply_for_npu(argparse.Namespace(), features=[])
    assert sys.modules["mindspeed.megatron_adaptor"].LOADED is True


def test_placeholder_mindspeed_is_explained(fake_mindspeed, clean_adaptor):
    with pytest.raises(PatchError, match="PyPI placeholder"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(), features=[])
    assert not mindspeed_patches.is_applied()


def test_mindspeed_for_another_megatron_is_explained(fake_mindspeed, clean_adaptor):
    (fake_mindspeed / "megatron_adaptor.py").write_text(
        "from megatron.core.transformer.attention import SymbolFromAnotherRelease\n")
    with pytest.raises(PatchError, match=r"SymbolFromAnotherRelease.*branch for megatron-core 0\.12\.1"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(), features=[])


def test_requiring_mindspeed_when_absent_is_an_error(clean_adaptor):
    assert not mindspeed_patches.adaptor.mindspeed_available()
    with pytest.raises(PatchError, match="not installed"):
        mindspeed_patches.apply_for_npu(argparse.Namespace(), features=[], use_mindspeed=True)
