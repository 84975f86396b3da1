"""``python -m fvtransform``."""

import sys

from fvtransform.cli import main

sys.exit(main())
