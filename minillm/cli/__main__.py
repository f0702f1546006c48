"""`python -m minillm.cli ...` (what torchrun runs) is the `minillm` command."""

import sys

from minillm.cli import main

sys.exit(main())
