#!/usr/bin/env python
"""PPO fine-tuning with a value head and the in-loop update tracker. See --help."""
import sys

from subnetscope.cli.ppo import main

if __name__ == "__main__":
    sys.exit(main())
