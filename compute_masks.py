"""Importance masks at a list of sparsities (or a run's 'ever changed' mask); see --help."""
import sys

from subnetscope.cli.compute_masks import main

if __name__ == "__main__":
    sys.exit(main())
