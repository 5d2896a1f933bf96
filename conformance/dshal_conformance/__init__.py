"""dshal-conformance: the shared suite every dshal backend plugin must pass.

Run it with ``dshal conformance --backend NAME`` or ``pytest --pyargs dshal_conformance
--dshal-backend NAME``; merge reports with ``dshal matrix``. See the package README.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
