"""Throwaway packages for the registry tests: written to a tmp dir, imported, then unloaded.

Each test gets a package with a unique name, so no test sees another's patched modules.
"""
import importlib
import sys
import textwrap
import uuid

import pytest

CORE = '''
def compute(x):
    return x + 1


def helper(x):
    return x * 10


LIMIT = 3


class Thing:
    def method(self, x):
        return ("method", x)

    @staticmethod
    def static(x):
        return ("static", x)

    @classmethod
    def klass(cls, x):
        return (cls.__name__, x)


class SubThing(Thing):
    pass
'''

USER = '''
from {pkg}.core import compute, Thing
from {pkg}.core import compute as aliased


def use(x):
    return compute(x)
'''

LATE = '''
from {pkg}.core import compute
'''


class ToyPackage:
    """Names and modules of one throwaway package."""

    def __init__(self, name: str):
        self.name = name

    @property
    def core(self):
        return sys.modules[f"{self.name}.core"]

    @property
    def user(self):
        return sys.modules[f"{self.name}.user"]

    def import_late(self):
        """A module that runs `from pkg.core import compute` only now (after a patch, say)."""
        return importlib.import_module(f"{self.name}.late")


@pytest.fixture
def toy_pkg(tmp_path):
    name = f"msp_toy_{uuid.uuid4().hex[:10]}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "core.py").write_text(textwrap.dedent(CORE))
    (root / "user.py").write_text(USER.format(pkg=name))
    (root / "late.py").write_text(LATE.format(pkg=name))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    importlib.import_module(f"{name}.core")
    importlib.import_module(f"{name}.user")
    try:
        yield ToyPackage(name)
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
