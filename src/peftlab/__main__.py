"""`python -m peftlab ...` is the `peftlab` command (handy under torchrun: `torchrun -m peftlab train ...`)."""

import sys

from peftlab.cli import main

sys.exit(main())
