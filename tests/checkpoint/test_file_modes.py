"""Checkpoint files get the mode open() gives any new file (0o666 less the umask), shards included.

The safetensors library creates its files 0600, so `create-tiny` shards used to be unreadable to
the group while config.json beside them was not; the converter's own writer hard-coded 0644.
"""
import os
import stat

import pytest

from megatron_vita.checkpoint.convert import convert
from megatron_vita.hf.tiny import create_tiny


@pytest.fixture
def umask_002():
    """A group-writable umask: 0o664 files, which neither 0600 nor a hard-coded 0644 gives."""
    previous = os.umask(0o002)
    try:
        yield 0o664
    finally:
        os.umask(previous)


def _modes(path):
    return {name: stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) for name in os.listdir(path)}


def test_shards_get_the_same_mode_as_the_config_files(tmp_path, umask_002):
    tiny = create_tiny(str(tmp_path / "tiny"))
    modes = _modes(tiny)
    assert sum(name.endswith(".safetensors") for name in modes) >= 2
    assert set(modes.values()) == {umask_002}, modes
    out = tmp_path / "hf"
    convert(tiny, str(out), "hf", "hf", max_shard_size=1 << 20, progress=False, log=lambda *a: None)
    modes = _modes(out)
    assert sum(name.endswith(".safetensors") for name in modes) >= 2
    assert set(modes.values()) == {umask_002}, modes


def test_create_tiny_again_leaves_no_stale_shards(tmp_path):
    out = str(tmp_path / "tiny")
    create_tiny(out, max_shard_size=300_000)
    many = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    create_tiny(out)
    few = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(many) > len(few) >= 2
    assert sorted(os.listdir(out)) == sorted(few + ["config.json", "generation_config.json",
                                                    "model.safetensors.index.json", "notes.txt"])
