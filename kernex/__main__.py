"""`python -m kernex`: the same as the `kernex` console script."""

from kernex.cli.main import main

main()
