"""`python -m silo.cli ...`: the command line without the console script, as `accelerate launch -m silo.cli`
needs (e.g. `accelerate launch --cpu --num_processes 2 -m silo.cli datastore build --config C`)."""

import sys

from silo.cli import main

sys.exit(main())
