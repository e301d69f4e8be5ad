"""`python -m fleet.chaos`: see fleet.chaos.run."""

import sys

from fleet.chaos.run import main

sys.exit(main())
