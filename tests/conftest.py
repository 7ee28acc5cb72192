import os

# The Triton interpreter runs tl.dot through numpy; numpy's OpenBLAS threads spinning against
# torch's OpenMP threads made those calls ~100x slower here, so numpy's BLAS runs single-threaded
# (set before torch, which imports numpy).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Kernels are tested on CPU tensors through the Triton interpreter; it must be switched on
# before `kernels` (and so triton.jit) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing in the tests may reach a hub.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
