"""Fixtures for the data tests: a small demo dataset, its tokenizer, the tiny model geometry, videos."""
import os

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from megatron_vita.data.demo import make_demo

    out = str(tmp_path_factory.mktemp("demo"))
    make_demo(out, seed=0, scale=0.1)
    return out


@pytest.fixture(scope="session")
def demo_tok(demo_dir):
    from megatron_vita.data.template import load_tokenizer

    return load_tokenizer(os.path.join(demo_dir, "tokenizer"))


@pytest.fixture(scope="session")
def tiny_cfg():
    from megatron_vita.config.model import ModelConfig

    return ModelConfig.from_name("tiny")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("index_cache"))
