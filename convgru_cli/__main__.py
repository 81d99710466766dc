"""`python -m convgru_cli`, also the entry point for `torchrun -m convgru_cli train ...`."""

from convgru_cli.cli import main

if __name__ == "__main__":
    main()
