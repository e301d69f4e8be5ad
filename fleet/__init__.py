"""Tools users run from a checkout: a local cluster, process launchers and measurements.

`scripts/` and `tests/` both import this package; it never imports `tests`. It is not part of
the installed eva-ws (setup.cfg, the image): it needs a checkout, for deploy/ and .cache/.
"""

from pathlib import Path
from typing import Final

# The checkout the tools run from: deploy/ templates, .cache/ for state and logs.
ROOT: Final = Path(__file__).resolve().parent.parent
