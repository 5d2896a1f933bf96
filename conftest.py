"""Repository-wide pytest setup.

* Without a CUDA/ROCm device, Triton kernels can only run under the interpreter, and
  Triton reads ``TRITON_INTERPRET`` when ``triton`` is first imported: set it before any
  test module can import triton, so test order never decides which mode a worker gets.
* Every test starts without an active dshal runtime.
"""

import pytest

from dshal.kernels.triton import ensure_interpreter_if_cpu

ensure_interpreter_if_cpu()


@pytest.fixture(autouse=True)
def _fresh_dshal_runtime():
    yield
    from dshal import runtime

    runtime.reset()
