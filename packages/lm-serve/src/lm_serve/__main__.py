"""`python -m lm_serve ...`: the same as the `lm-serve` script."""

from lm_serve.cli import main

main()
