"""`python -m graphopt.distributed compress ...` (what torchrun starts in each process): the CLI's own
`graphopt compress --distributed ...` (graphopt.cli.distributed_main)."""
import sys

from graphopt.cli import distributed_main

if __name__ == "__main__":
    sys.exit(distributed_main())
