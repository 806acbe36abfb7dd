"""Fixtures for training tests: the synthetic demo dataset, made once per session."""
import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from megatron_vita.data.demo import make_demo

    out = str(tmp_path_factory.mktemp("demo_data"))
    make_demo(out, seed=0, scale=0.3, overwrite=True)
    return out
