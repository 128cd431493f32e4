"""``python -m sdlens ...`` (and ``accelerate launch -m sdlens sweep ...``): the ``sdlens`` command."""

import sys

from .cli import main

sys.exit(main())
