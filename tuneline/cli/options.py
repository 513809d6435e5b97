"""What the `tuneline` sub-commands share: the artifacts folder option and the exit for an input
a person must fix (the message in red, no traceback, exit code 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tuneline.errors import UserError

ArtifactsDir = Annotated[Path, typer.Option("--artifacts-dir", help="The recipe's artifacts_dir.")]
DEFAULT_ARTIFACTS_DIR = Path(".tuneline")


def fail(error: UserError | str, code: int = 2) -> typer.Exit:
    """Print the error (no traceback) and return the exit to raise: 2 when the input cannot be
    used, 1 when something else failed (a server that did not start)."""
    typer.secho(str(error), err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def quiet_environment(prefect_home: Path) -> None:
    """The project's Prefect home, no analytics, and no progress bars in the run's log.

    Set before Prefect, transformers or datasets are imported: they read these at import time.
    """
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    for name, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("TQDM_DISABLE", "1"),
        ("GX_ANALYTICS_ENABLED", "false"),
        # Tuneline's own log lines (a run waiting for another's stage) in the task's log too.
        ("PREFECT_LOGGING_EXTRA_LOGGERS", "tuneline"),
    ):
        os.environ.setdefault(name, value)
