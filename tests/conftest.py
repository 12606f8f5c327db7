"""Test harness.

Kernel tests run everywhere: compiled on a CUDA machine, and through Triton's interpreter on
a CPU-only one. Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` kernel is defined,
so it is set here, before any test module (and so any mimfast kernel) is imported.
``MIMFAST_TEST_DEVICE=cpu`` forces the interpreter on a CUDA machine too.
"""

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if os.environ.get("MIMFAST_TEST_DEVICE", "") == "cpu" or not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("MIMFAST_TEST_DEVICE", "cpu")
else:
    os.environ.setdefault("MIMFAST_TEST_DEVICE", "cuda")

# Launch configurations fixed to the launchers' defaults (kernels.tuning would time candidates on
# a GPU at each new shape, adding launches and choices that differ run to run); test_tuning.py
# turns tuning on where it tests it.
os.environ.setdefault("MIMFAST_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import bounds_check  # noqa: E402

    bounds_check.install()  # every interpreted load and store stays inside its launch's tensors

# The suite's tensors are small: one intra-op thread avoids OpenMP spin-waiting, which
# slows CPU runs many times over whenever another process shares the cores.
torch.set_num_threads(1)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: 'cuda' (compiled) or 'cpu' (interpreted)."""
    return os.environ["MIMFAST_TEST_DEVICE"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """Full-precision fp32 convolutions and matmuls on CUDA (cuDNN convolutions default to TF32)
    for the duration of a test. Saved and restored by plain attribute access: torch serves these
    switches through ``__getattr__``/``__setattr__``, which pytest's monkeypatch (9.2) undoes by
    deleting the attribute, an error."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = previous


@pytest.fixture
def dynamo_recompile_limit():
    """Restores ``torch._dynamo.config.recompile_limit`` after a test, by plain attribute access
    (a config module attribute pytest's monkeypatch (9.2) would delete on undo, as above)."""
    import torch._dynamo

    previous = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = previous
