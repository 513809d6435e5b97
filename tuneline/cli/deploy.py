"""`tuneline deploy RECIPE`: the deployments of deployments/prefect.yaml on the current Prefect
server (PREFECT_API_URL, or the project's local one), for this recipe, with their schedules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tuneline.cli.options import fail, quiet_environment
from tuneline.errors import UserError
from tuneline.recipe import load_recipe


def deploy_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe the deployments run.", show_default=False)],
    prefect_file: Annotated[
        Path, typer.Option(help="Prefect's deployment file describing flows, work pools and schedules.")
    ] = Path("deployments/prefect.yaml"),
    only: Annotated[
        list[str] | None, typer.Option(help="Deploy only these flows (repeat): finetune, refresh, ...")
    ] = None,
) -> None:
    """Create or update the recipe's deployments (finetune, augment, refresh on the recipe's
    schedule, retention daily) and their work pool on the Prefect server; then say how to start
    a worker."""
    try:
        loaded = load_recipe(recipe)
    except UserError as error:
        raise fail(error) from None
    home = Path(loaded.work_dir).resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    quiet_environment(home)
    from tuneline.flows.deploy import deploy, describe_schedules, plan_deployments
    from tuneline.flows.server import ServerStartError, local_prefect_server

    local = not os.environ.get("PREFECT_API_URL")
    try:
        planned = plan_deployments(loaded, prefect_file, only=only)
        with local_prefect_server(home) as api_url:
            created = deploy(api_url, planned, Path.cwd())
    except UserError as error:
        raise fail(error) from None
    except ServerStartError as error:
        raise fail(str(error), 1) from None
    for pool in created:
        typer.echo(f"Created work pool {pool!r} (type process).")
    for item in planned:
        schedule = describe_schedules(item.schedules)
        typer.echo(f"{item.full_name:<32} pool {item.work_pool:<10} schedule {schedule}")
    pools = " ".join(f"--pool {pool}" for pool in sorted({item.work_pool for item in planned}))
    typer.echo(f"\nStart a worker; it runs the flows in {Path.cwd()}:")
    typer.echo(f"  PREFECT_API_URL={api_url} prefect worker start {pools}")
    typer.echo(f"Prefect UI: {api_url.removesuffix('/api')}")
    if local:
        typer.echo(
            "This is the project's local server: it stays up while a worker polls it. For a server "
            "shared by a team, set PREFECT_API_URL (docs/deployments.md)."
        )
