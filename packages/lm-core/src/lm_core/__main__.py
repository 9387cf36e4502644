"""`python -m lm_core`: the `lm` command."""

from lm_core.cli import main

if __name__ == "__main__":
    main(prog_name="lm")
