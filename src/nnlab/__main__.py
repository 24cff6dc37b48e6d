"""`python -m nnlab ...` (and `torchrun -m nnlab ...`) runs the CLI."""

from nnlab.cli import run

run()
