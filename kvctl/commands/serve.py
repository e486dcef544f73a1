"""`kvctl serve`: controller, codec worker and inference engine in one process."""

from __future__ import annotations

import typer


def serve() -> None:
    """Run the controller, the codec worker and the inference engine in one process."""
    raise typer.Exit(1)
