"""Features: one class per NPU optimisation, switched on by the command-line flag of its name.

A feature owns its flags (`register_args`), the checks on their values (`validate_args`),
which other features it excludes or needs (`incompatible_check`, `dependency_check`), and the
patches it registers when enabled (`register_patches`). It never edits megatron files: it
only registers patches on a `PatchRegistry`.

`FeatureManager` runs a list of feature classes over an argparse parser or Namespace:
it adds their flags, validates the enabled ones (every problem reported at once, each line
naming its flag) and lets the enabled ones register their patches.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Iterable, List, Optional, Sequence, Type

from mindspeed_patches.registry import PatchRegistry

_FLAG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


class FeatureArgumentError(ValueError):
    """A feature's flags are inconsistent; the message names the flag(s)."""


def flag_dest(flag: str) -> str:
    """The argparse attribute of a flag name: 'use-fused-rmsnorm' -> 'use_fused_rmsnorm'."""
    return flag.lstrip("-").replace("-", "_")


def flag_enabled(args: argparse.Namespace, flag: str) -> bool:
    return bool(getattr(args, flag_dest(flag), False))


class Feature:
    """Base class of a feature. Subclasses set `name` (the flag without '--') and `help`."""

    name: str = ""
    help: str = ""
    # Flags (without '--') this feature cannot be combined with / needs switched on as well.
    incompatible_with: Sequence[str] = ()
    requires: Sequence[str] = ()

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return flag_dest(self.name)

    def is_enabled(self, args: argparse.Namespace) -> bool:
        return flag_enabled(args, self.name)

    def register_args(self, parser: Any) -> None:
        """Add this feature's flags to `parser` (an ArgumentParser or an argument group)."""
        parser.add_argument(self.flag, action="store_true", default=False, help=self.help)

    def validate_args(self, args: argparse.Namespace) -> None:
        """Check this feature's option values; raise ValueError (naming the flag) when wrong."""

    def incompatible_check(self, args: argparse.Namespace) -> None:
        for other in self.incompatible_with:
            if flag_enabled(args, other):
                raise FeatureArgumentError(f"{self.flag} cannot be combined with --{other}")

    def dependency_check(self, args: argparse.Namespace) -> None:
        for needed in self.requires:
            if not flag_enabled(args, needed):
                raise FeatureArgumentError(f"{self.flag} requires --{needed}")

    def register_patches(self, registry: PatchRegistry, args: argparse.Namespace) -> None:
        """Register this feature's patches on `registry` (only called when enabled)."""


class FeatureManager:
    """Registers the flags of, validates and collects the patches of a list of feature classes."""

    GROUP_TITLE = "NPU features (mindspeed_patches)"

    def __init__(self, feature_classes: Iterable[Type[Feature]]):
        self.features: List[Feature] = []
        seen = {}
        for cls in feature_classes:
            if not (isinstance(cls, type) and issubclass(cls, Feature)):
                raise TypeError(f"mindspeed_patches: {cls!r} is not a Feature subclass")
            if not _FLAG.fullmatch(cls.name or ""):
                raise ValueError(f"mindspeed_patches: feature {cls.__qualname__} has name {cls.name!r}; "
                                 "expected its CLI flag without '--', e.g. 'use-fused-rmsnorm'")
            if cls.name in seen:
                raise ValueError(f"mindspeed_patches: features {seen[cls.name]} and {cls.__qualname__} "
                                 f"both claim --{cls.name}")
            seen[cls.name] = cls.__qualname__
            self.features.append(cls())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add every feature's flags to `parser`, in one argument group."""
        group = parser.add_argument_group(self.GROUP_TITLE)
        for feature in self.features:
            try:
                feature.register_args(group)
            except argparse.ArgumentError as e:
                raise ValueError(f"mindspeed_patches: feature {feature.name} cannot add its flags: {e}") from e

    def parser(self) -> argparse.ArgumentParser:
        """A parser holding only the feature flags (no -h, no prefix matching)."""
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        self.add_arguments(parser)
        return parser

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """The feature flags found in `argv`; everything else in it is ignored."""
        args, _ = self.parser().parse_known_args(list(argv))
        return args

    def complete_args(self, args: argparse.Namespace) -> argparse.Namespace:
        """Give `args` (in place) the default of every feature option it lacks."""
        defaults = self.parse([])
        for key, value in vars(defaults).items():
            if not hasattr(args, key):
                setattr(args, key, value)
        return args

    def enabled(self, args: argparse.Namespace) -> List[Feature]:
        return [f for f in self.features if f.is_enabled(args)]

    def validate(self, args: argparse.Namespace) -> None:
        """Run every enabled feature's checks; raise one FeatureArgumentError listing all problems."""
        problems = []
        for feature in self.enabled(args):
            for check in (feature.validate_args, feature.incompatible_check, feature.dependency_check):
                try:
                    check(args)
                except FeatureArgumentError as e:
                    problems.append(str(e))
                except (ValueError, TypeError) as e:
                    problems.append(f"{feature.flag}: {e}")
        if problems:
            raise FeatureArgumentError("mindspeed_patches: invalid feature flags:\n  " + "\n  ".join(problems))

    def register_patches(self, registry: PatchRegistry, args: argparse.Namespace) -> List[str]:
        """Let every enabled feature register its patches; return their names."""
        names = []
        for feature in self.enabled(args):
            feature.register_patches(registry, args)
            names.append(feature.name)
        return names

    def run(self, registry: PatchRegistry, args: Optional[argparse.Namespace] = None,
            argv: Sequence[str] = ()) -> List[str]:
        """Complete (or parse from `argv`), validate, register patches; return the enabled names."""
        args = self.complete_args(args) if args is not None else self.parse(argv)
        self.validate(args)
        return self.register_patches(registry, args)
