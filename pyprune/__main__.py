"""``python -m pyprune ...`` is the ``pyprune`` command."""
import sys

from .cli import main

sys.exit(main())
