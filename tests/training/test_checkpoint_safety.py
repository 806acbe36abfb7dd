"""--load refuses a training checkpoint whose pickles would run code, before megatron opens it.

megatron-core reads `common.pt` and the DCP `.metadata` with plain pickle; the training loader
checks both with weights-only / restricted unpicklers first. The payload, run unsafely, would
create a marker file: after the refusal the marker must not exist.
"""
import os
import pickle

from mv_testlib import spawn


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _save_and_load(rank, world, hf_dir, root, poison):
    import torch

    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training import checkpointing
    from megatron_vita.training.config import TrainConfig, stage_defaults, to_namespace
    from megatron_vita.training.engine import train_step
    from megatron_vita.training.loop import setup_model_and_optimizer
    from mv_testlib import multimodal_batch

    model_config = ModelConfig.from_hf_dir(hf_dir)
    cfg = TrainConfig.from_flags(init_hf=hf_dir, train_iters=2, **stage_defaults(1))
    par = ParallelConfig()
    with parallel_layout(par):
        ddp, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config, par)
        train_step(ddp, optimizer, multimodal_batch(model_config, seq_len=32))  # Adam state exists now
        path = checkpointing.save_checkpoint(root, 1, ddp, optimizer, scheduler, args=to_namespace(cfg),
                                             model_config=model_config, data_state=None)
        loaded = checkpointing.load_checkpoint(root, ddp, optimizer, scheduler)
        assert loaded["iteration"] == 1
        target, marker = poison
        with open(os.path.join(path, target), "wb") as f:
            torch.save({"x": _Payload(marker)}, f) if target == "common.pt" else pickle.dump(_Payload(marker), f)
        try:
            checkpointing.load_checkpoint(root, ddp, optimizer, scheduler)
        except Exception as e:  # the refusal
            return f"{type(e).__name__}: {e}"
        return None


def test_load_refuses_malicious_pickles(tiny_hf_dir, tmp_path):
    for target in ("common.pt", ".metadata"):
        marker = str(tmp_path / f"pwned_{target.strip('.')}")
        error = spawn(_save_and_load, 1, tiny_hf_dir, str(tmp_path / f"ckpt_{target.strip('.')}"),
                      (target, marker), timeout=300)[0]
        assert error is not None, f"a poisoned {target} was loaded"
        assert target.strip(".") in error or "refus" in error.lower(), error
        assert not os.path.exists(marker), "the payload ran"
