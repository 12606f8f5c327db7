"""benchmarks.compile_check's memory-instruction report (``--mem``): one real sm_90 compile
through Triton's bundled ptxas, in a subprocess (the module must be imported before the kernels,
which this test process has already imported under the interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="an offline check for CPU machines; the GPU suite's minutes "
                    "go to tests compiled and run on the device")
def test_mem_report_of_the_permuted_patch_loss_walk():
    """The permuted walk with prefetched weights compiles for sm_90 with no spills, and its PTX
    loads the fp32 pixels in 16-byte vectors (``ld.global.v4.b32``) and moves the predictions
    through shared memory (the permutation)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    match = ("_patch_loss_fwd_kernel IMG_ORDER=3 PREFETCH_W=1 NORM_PIX=1 L1=0 PATCH=16 C=3 pred_ptr:bf16 "
             "imgs_ptr:fp32")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--only", "patch_loss", "--all", "--jobs", "1",
         "--mem", "--match", match],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    ok = [i for i, line in enumerate(lines) if line.startswith("OK ")]
    assert ok, out.stdout[-2000:]
    for i in ok:
        assert "SPILLS" not in lines[i] and "IMG_ORDER=3" in lines[i] and "PREFETCH_W=1" in lines[i]
        mem = dict(item.split(": ") for item in lines[i + 1].split("  ") if ": " in item)
        assert int(mem.get("ld.global.v4.b32", 0)) > 0, lines[i + 1]
        assert int(mem.get("st.shared.v4.b32", 0)) + int(mem.get("st.shared.b16", 0)) + \
            int(mem.get("st.shared.b32", 0)) > 0, lines[i + 1]
        assert int(mem["bar.sync"]) > 0
