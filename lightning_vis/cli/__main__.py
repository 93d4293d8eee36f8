"""python -m lightning_vis.cli"""

import sys

from . import main

sys.exit(main())
