"""dshal backend for NVIDIA GPUs: ``NvidiaBackend`` (entry point ``nvidia``).

Importing this package imports no vendor runtime: triton loads when a kernel first runs,
pynvml when :meth:`NvidiaBackend.topology` is first asked.
"""

from dshal_nvidia.backend import NVIDIA_PEAKS, NvidiaBackend

__version__ = "0.1.0"

__all__ = ["NVIDIA_PEAKS", "NvidiaBackend", "__version__"]
