"""``python -m prunekit.cli``: the same as the ``prunekit`` command."""
import sys

from . import main

sys.exit(main())
