"""dshal backend for Huawei Ascend NPUs (``dshal-ascend``).

Importing this package never imports ``torch_npu``; see :mod:`dshal_ascend.probe`.
"""

from dshal_ascend.backend import AscendBackend

__version__ = "0.1.0"
__all__ = ["AscendBackend", "__version__"]
