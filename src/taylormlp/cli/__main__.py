"""python -m taylormlp.cli"""

import sys

from .parser import main

sys.exit(main())
