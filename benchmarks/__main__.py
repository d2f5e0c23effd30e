"""``python -m benchmarks``: the same as ``kvmlab bench all``."""

import sys

from benchmarks import main

sys.exit(main())
