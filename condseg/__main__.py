"""``python -m condseg``: the ``condseg`` command."""
import sys

from .cli import main

sys.exit(main())
