"""`python -m subnetscope SUB ...`: the same as the `subnetscope` console command."""
import sys

from .cli.app import main

sys.exit(main())
