"""``python -m fewstep``: the command line (also what ``torchrun -m fewstep`` starts)."""

import sys

from fewstep.cli import main

sys.exit(main())
