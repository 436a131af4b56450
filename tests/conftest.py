"""Test configuration shared by every test file.

* Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` when this machine has no NVIDIA
  GPU. The variable must be set before Triton is imported, and the GPU is recognised without calling
  ``torch.cuda`` (no CUDA call at import, in the package or in the tests).
* Tests marked ``gpu`` are skipped when no CUDA device is usable (checked lazily, at collection).
* Autotuning is off (``MDLM_CTC_AUTOTUNE=0``): kernels use their default configs. Only the gradient's
  dense kernel is ever autotuned, and every config in its list is run by
  ``test_gradient_bits_do_not_depend_on_the_dense_config`` (identical bits) and compiled for sm_90 by
  ``test_triton_resources.py`` (no spills), so what the autotuner can pick is tested.
"""

import os
import shutil


def _nvidia_device_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _nvidia_device_present():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("MDLM_CTC_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
