"""``python -m fewstep.cli``: the command line, as ``python -m fewstep``."""

import sys

from fewstep.cli import main

sys.exit(main())
