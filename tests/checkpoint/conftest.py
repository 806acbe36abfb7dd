"""Fixtures for the checkpoint tests: the tiny checkpoint (root conftest) and a TP8-capable one."""
import pytest


@pytest.fixture(scope="session")
def wide_hf_dir(tmp_path_factory):
    """A tiny random HF checkpoint whose heads, KV groups and widths all divide 8 (for TP4/TP8)."""
    from ckpttest_lib import wide_config, write_hf

    return write_hf(str(tmp_path_factory.mktemp("wide_long_vita")), wide_config(), seed=1)


@pytest.fixture(scope="session")
def tiny_tensors(tiny_hf_dir):
    from ckpttest_lib import hf_tensors

    return hf_tensors(tiny_hf_dir)


@pytest.fixture(scope="session")
def wide_tensors(wide_hf_dir):
    from ckpttest_lib import hf_tensors

    return hf_tensors(wide_hf_dir)
