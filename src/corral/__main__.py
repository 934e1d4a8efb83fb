"""``python -m corral``: the ``corral`` command."""

import sys

from corral._cli import main

sys.exit(main())
