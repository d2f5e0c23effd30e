"""``python -m kvmlab ...``: same as the ``kvmlab`` command."""

import sys

from .cli import main

sys.exit(main())
