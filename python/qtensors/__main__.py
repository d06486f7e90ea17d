"""`python -m qtensors ...` runs the `qtensors` command line."""

import sys

from .cli import main

sys.exit(main())
