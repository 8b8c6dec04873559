"""``python -m zinit`` (and ``torchrun -m zinit``) runs the ``zinit`` command."""

import sys

from .cli import main

sys.exit(main())
