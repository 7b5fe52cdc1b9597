#!/usr/bin/env python
"""A run's step checkpoint as a folder that from_pretrained loads. See --help."""
import sys

from subnetscope.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
