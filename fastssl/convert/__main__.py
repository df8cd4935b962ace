"""``python -m fastssl.convert``: the same as ``fastssl-convert``."""

import sys

from fastssl.convert.cli import main

sys.exit(main())
