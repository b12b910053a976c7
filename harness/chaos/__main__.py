"""``python -m harness.chaos [options]``: see :mod:`harness.chaos.run`."""

import sys

from .run import main

sys.exit(main())
