"""dshal backend for AMD Instinct GPUs: ``AmdBackend`` (entry point ``amd``).

Importing this package imports no vendor runtime: triton loads when a kernel first runs,
amdsmi when :meth:`AmdBackend.topology` is first asked.
"""

from dshal_amd.backend import AMD_PEAKS, AmdBackend
from dshal_amd.checkpoint import e4m3fn_to_e4m3fnuz
from dshal_amd.topology import XgmiTopology

__version__ = "0.1.0"

__all__ = ["AMD_PEAKS", "AmdBackend", "XgmiTopology", "e4m3fn_to_e4m3fnuz", "__version__"]
