"""``python -m longtrain.plan``: see :mod:`longtrain.plan.cli`."""
import sys

from longtrain.plan.cli import main

sys.exit(main())
