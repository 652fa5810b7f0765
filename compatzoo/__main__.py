"""``python -m compatzoo``, which is how ``torchrun`` launches a command:
``torchrun --nproc_per_node 2 -m compatzoo run spec.yaml``."""

import sys

from compatzoo.cli import main

sys.exit(main())
