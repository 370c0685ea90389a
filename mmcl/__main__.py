"""`python -m mmcl ...` (and `accelerate launch -m mmcl train ...`)."""
import sys

from mmcl.cli import main

sys.exit(main())
