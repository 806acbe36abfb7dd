"""Suite-wide fixtures. Multi-process tests spawn their own gloo ranks (see mv_testlib.spawn)."""
import pytest

import megatron_vita  # noqa: F401  (registers the Long-VITA HF classes for every test)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Long-VITA checkpoint in the released HF layout, shared by the session."""
    from mv_testlib import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_long_vita")))
