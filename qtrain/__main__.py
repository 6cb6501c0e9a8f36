"""`python -m qtrain ...` (also what `torchrun -m qtrain` and `deepspeed --module qtrain` run)."""

import sys

from qtrain.cli import main

sys.exit(main())
