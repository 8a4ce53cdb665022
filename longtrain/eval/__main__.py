"""``python -m longtrain.eval``: see :mod:`longtrain.eval.cli`."""
import sys

from longtrain.eval.cli import main

sys.exit(main())
