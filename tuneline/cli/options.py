"""What the `tuneline` sub-commands share: the artifacts folder option and the exit for an input
a person must fix (the message in red, no traceback, exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneline.errors import UserError

ArtifactsDir = Annotated[Path, typer.Option("--artifacts-dir", help="The recipe's artifacts_dir.")]
DEFAULT_ARTIFACTS_DIR = Path(".tuneline")


def fail(error: UserError | str) -> typer.Exit:
    """Print the error (no traceback) and return the exit to raise: the input cannot be used."""
    typer.secho(str(error), err=True, fg=typer.colors.RED)
    return typer.Exit(2)
