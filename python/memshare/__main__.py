"""``python -m memshare``: the command line (see ``memshare._cli``)."""

import sys

from ._cli import main

sys.exit(main())
