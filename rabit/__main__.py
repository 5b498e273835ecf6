"""``python -m rabit ...``: the same as the ``rabit`` console script."""

import sys

from .cli import main

sys.exit(main())
