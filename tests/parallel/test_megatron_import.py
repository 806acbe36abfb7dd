"""megatron-core's import-time torch.compile calls are deferred to first use (megatron_import).

In a fresh interpreter: after `import megatron_vita`, importing megatron-core loads neither
torch._dynamo nor torch._inductor (they cost 5 s per process), `torch.compile` is torch's own
again afterwards, and megatron's compiled helper still gives its function's results through a
real torch.compile at its first call.
"""
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, sys
    import megatron_vita
    import torch
    real = torch.compile
    import megatron.core
    from megatron.core import jit
    from megatron.core.transformer.utils import gelu_impl
    after_import = {m: m in sys.modules for m in ("torch._dynamo", "torch._inductor")}
    x = torch.linspace(-3, 3, 7)
    expected = gelu_impl.__wrapped__(x)
    got = gelu_impl(x)
    print(json.dumps({"after_import": after_import, "compile_restored": torch.compile is real,
                      "jit_fuser_defers_to_torch": getattr(jit.jit_fuser, "deferring", None) is real,
                      "dynamo_after_call": "torch._dynamo" in sys.modules,
                      "max_diff": float((got - expected).abs().max())}))
""")


@pytest.mark.timeout(300)
def test_megatron_core_imports_without_dynamo_and_compiles_at_first_call():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["after_import"] == {"torch._dynamo": False, "torch._inductor": False}, report
    assert report["compile_restored"] and report["jit_fuser_defers_to_torch"], report
    assert report["dynamo_after_call"] and report["max_diff"] <= 1e-6, report
