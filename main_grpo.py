#!/usr/bin/env python
"""GRPO fine-tuning with an in-loop update tracker. See --help."""
import sys

from subnetscope.cli.grpo import main

if __name__ == "__main__":
    sys.exit(main())
