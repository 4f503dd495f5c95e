"""`python -m epts ...` is the `epts` command."""

import sys

from .cli import main

sys.exit(main())
