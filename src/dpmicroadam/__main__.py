"""`python -m dpmicroadam` runs the command line."""

import sys

from dpmicroadam.cli import main

sys.exit(main())
