"""`python -m domino_ray ...` is the `domino` command."""

import sys

from domino_ray.cli import main

sys.exit(main())
