"""Entry point for `python -m kvctl` and the `kvctl` console script."""

from kvctl.cli import main

if __name__ == "__main__":
    main()
