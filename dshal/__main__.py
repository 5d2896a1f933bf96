"""``python -m dshal`` (also ``torchrun ... -m dshal run``)."""

import sys

from dshal.cli import main

sys.exit(main())
