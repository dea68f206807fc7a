"""`python -m lkflow ...` runs the `lkflow` command."""

from lkflow.cli import main

main()
