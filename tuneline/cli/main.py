"""The `tuneline` command line.

Heavy libraries (torch, transformers, Prefect, MLflow) are imported inside the commands that
need them, so `tuneline recipe check` and `tuneline data inspect` start in well under a second.
The CLI is the application's entry point: `run` and `quickstart` are the one place that reaches
into `flows/`, which sits above this package.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from pathlib import Path
from typing import Annotated

import typer

from tuneline.cli.compare import compare_app
from tuneline.cli.data import data_app
from tuneline.cli.deploy import deploy_command
from tuneline.cli.export import export_command
from tuneline.cli.options import fail, quiet_environment
from tuneline.cli.retention import retention_command
from tuneline.cli.review import review_app
from tuneline.cli.runs import runs_app
from tuneline.cli.serve import serve_command
from tuneline.errors import UserError, quiet_user_errors
from tuneline.recipe import Recipe, RecipeError, load_recipe

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Fine-tune language models as one pipeline."
)
recipe_app = typer.Typer(no_args_is_help=True, help="Check recipes and show their schema.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data", help="Inspect and convert datasets.")
train_app = typer.Typer(no_args_is_help=True, help="Plan training runs.")
app.add_typer(train_app, name="train")
app.add_typer(review_app, name="review")
app.add_typer(compare_app, name="compare")
app.command("serve")(serve_command)
app.command("export")(export_command)
app.add_typer(runs_app, name="runs")
app.command("retention")(retention_command)
app.command("deploy")(deploy_command)

QUICKSTART_RECIPE = Path("recipes/quickstart.yaml")
QUICKSTART_DATA = Path("recipes/data/support_intents.jsonl")
QUICKSTART_MODEL = Path(".tuneline/models/tiny-chat")
MLFLOW_AUTH_DIR = "mlflow-auth"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=2")]


def read_recipe(path: Path, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(path, overrides or [])
    except RecipeError as error:
        raise fail(str(error), 2) from None


@recipe_app.command("check")
def recipe_check(path: Path, overrides: Overrides = None) -> None:
    """Validate a recipe and list every problem with its field path (exit 2 if any)."""
    recipe = read_recipe(path, overrides)
    typer.echo(f"{path}: ok ({len(recipe.sources)} source(s), model {recipe.model.name})")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON schema (every field, its default and description)."""
    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@train_app.command("plan")
def train_plan(
    path: Path,
    overrides: Overrides = None,
    device: Annotated[
        str | None, typer.Option(help="Plan for cuda (bf16 weights) or cpu (fp32); default: this machine.")
    ] = None,
) -> None:
    """Trainable parameters and estimated peak memory of the recipe's training, no weights loaded."""
    recipe = read_recipe(path, overrides)
    from tuneline.train.plan import format_plan, plan_training

    try:
        plan = plan_training(recipe.model, recipe.train, device=device)
    except UserError as error:
        raise fail(str(error), 2) from None
    typer.echo(format_plan(plan))


@app.command("make-tiny-model")
def make_tiny_model_command(
    out_dir: Path,
    corpus: Annotated[Path, typer.Option(help="A dataset file whose text trains the tokenizer.")],
    hidden_size: int = 128,
    num_layers: int = 4,
    vocab_size: int = 1000,
) -> None:
    """Build a small Llama-architecture model and a locally trained tokenizer with a chat template."""
    from tuneline.formats import FormatError, iter_file
    from tuneline.models import make_tiny_model

    try:
        texts = [
            m["content"] for item in iter_file(str(corpus)) if item.record for m in item.record["messages"]
        ]
    except (FormatError, OSError) as error:
        raise fail(f"--corpus {corpus}: {error}", 2) from None
    if not texts:
        raise fail(f"--corpus {corpus}: no readable records to train a tokenizer on", 2)
    path = make_tiny_model(
        out_dir, texts, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers
    )
    typer.echo(f"tiny model and tokenizer written to {path}")


@app.command("run")
def run_command(path: Path, overrides: Overrides = None) -> None:
    """Run the finetune flow on a recipe, on a local Prefect server started for the run."""
    recipe = read_recipe(path, overrides)
    run_recipe(recipe)


@app.command("quickstart")
def quickstart() -> None:
    """Build the tiny local base model if needed, then run recipes/quickstart.yaml."""
    if not QUICKSTART_RECIPE.is_file():
        raise fail(f"{QUICKSTART_RECIPE} not found: run the quickstart from the Tuneline project folder", 2)
    recipe = read_recipe(QUICKSTART_RECIPE, None)
    quiet_environment(Path(recipe.work_dir).resolve() / "prefect")
    if not (QUICKSTART_MODEL / "config.json").is_file():
        typer.echo(
            f"Building the quickstart's tiny base model in {QUICKSTART_MODEL} (nothing is downloaded)..."
        )
        make_tiny_model_command(QUICKSTART_MODEL, QUICKSTART_DATA)
    run_recipe(recipe)


def run_recipe(recipe: Recipe) -> dict:
    """Start (or reuse) a Prefect server, run the flow, print the report; exit 1 if it failed."""
    home = Path(recipe.work_dir).resolve() / "prefect"
    quiet_environment(home)
    from tuneline.cli.console import print_failure, print_report
    from tuneline.flows.server import IDLE_ENV, ServerStartError, idle_seconds, local_prefect_server

    local = not os.environ.get("PREFECT_API_URL")
    # Import the flow (Prefect, torch, transformers: ~6 s) while the server starts (~5 s).
    preload = threading.Thread(target=importlib.import_module, args=("tuneline.flows.finetune",), daemon=True)
    preload.start()
    try:
        with local_prefect_server(home) as api_url:
            preload.join()
            from prefect.logging.handlers import APILogHandler
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from tuneline.flows.finetune import finetune

            quiet_user_errors()

            with temporary_settings({PREFECT_API_URL: api_url}):
                try:
                    summary = finetune(recipe)
                except Exception as error:  # noqa: BLE001 - the flow's failure is shown, not re-raised
                    print_failure(error)
                    raise typer.Exit(1) from None
                finally:
                    APILogHandler().flush()  # send the last logs before the server stops
    except ServerStartError as error:
        raise fail(str(error), 1) from None
    print_report(summary, recipe, api_url.removesuffix("/api"))
    if local and idle_seconds() > 0:
        typer.echo(
            f"The project's Prefect server stays up for the next run; it stops after {idle_seconds():.0f} s "
            f"idle ({IDLE_ENV}), or now with `tuneline server stop`."
        )
    return summary


RecipeArgument = Annotated[
    Path, typer.Argument(help="Recipe whose artifacts, Prefect server and MLflow store to use.")
]


@app.command("ui")
def ui(
    recipe_path: RecipeArgument = QUICKSTART_RECIPE,
    prefect_port: Annotated[
        int, typer.Option(help="Port for the Prefect UI if the project's server is not running yet.")
    ] = 4200,
    mlflow_port: int = 5000,
    mlflow_auth: Annotated[
        bool,
        typer.Option(
            help="Ask for a user name and password in the MLflow UI (MLflow's basic-auth app, users kept "
            f"in <artifacts_dir>/{MLFLOW_AUTH_DIR}/); the first start creates the admin from "
            f"{ADMIN_PASSWORD_ENV} (and MLFLOW_AUTH_ADMIN_USERNAME, default admin)."
        ),
    ] = False,
) -> None:
    """Serve the Prefect UI (runs, funnel artifacts) and the MLflow UI (metrics, models) until Ctrl-C."""
    import subprocess

    from tuneline.flows.server import ServerStartError, local_prefect_server, recorded_server, stop_server

    recipe = read_recipe(recipe_path, None)
    home = Path(recipe.work_dir).resolve() / "prefect"
    auth_dir = Path(recipe.work_dir).resolve() / MLFLOW_AUTH_DIR if mlflow_auth else None
    if auth_dir and not (auth_dir / "basic_auth.db").is_file() and not os.environ.get(ADMIN_PASSWORD_ENV):
        raise fail(
            f"--mlflow-auth: no MLflow users yet in {auth_dir}; set {ADMIN_PASSWORD_ENV} (and "
            "MLFLOW_AUTH_ADMIN_USERNAME, default admin) for this first start to create the admin user",
            2,
        )
    wanted = [(mlflow_port, "--mlflow-port")]
    if recorded_server(home) is None:  # a running one is reused on its own port
        wanted.append((prefect_port, "--prefect-port"))
    for port, option in wanted:
        if not port_free(port):
            raise fail(f"{option} {port}: the port is in use; pick another, e.g. {option} {port + 1}", 2)
    os.environ.pop("PREFECT_API_URL", None)  # the project's own server, not a configured one
    mlflow, env = mlflow_ui_command(recipe.register.tracking_uri, mlflow_port, auth_dir)
    try:
        with local_prefect_server(home, port=prefect_port) as api_url:
            process = subprocess.Popen(mlflow, env=env)
            prefect_url = api_url.removesuffix("/api")
            mlflow_url = f"http://127.0.0.1:{mlflow_port}" + (" (basic auth)" if auth_dir else "")
            typer.echo(f"Prefect: {prefect_url}   MLflow: {mlflow_url}   (Ctrl-C stops)")
            try:
                process.wait()
            except KeyboardInterrupt:
                process.terminate()
    except ServerStartError as error:
        raise fail(str(error), 1) from None
    stop_server(home, only_if_unused=True)


def mlflow_ui_command(
    tracking_uri: str, port: int, auth_dir: Path | None
) -> tuple[list[str], dict[str, str]]:
    """The MLflow UI's command line and environment: on 127.0.0.1 only, one worker, and with
    `auth_dir`, MLflow's basic-auth app whose users live in that folder (not in the working dir)."""
    import secrets
    import sys

    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", tracking_uri]
    # Job execution (MLflow's GenAI jobs, unused here) would start 7 huey consumer processes.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if auth_dir is None:
        return command, env
    auth_dir.mkdir(parents=True, exist_ok=True)
    config = auth_dir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{auth_dir / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    # The key that signs its CSRF tokens: the user's, or a fresh one each start (nothing stored).
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return [*command, "--app-name", "basic-auth"], {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config)}


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


server_app = typer.Typer(no_args_is_help=True, help="The project's local Prefect server (runs share it).")
app.add_typer(server_app, name="server")


@server_app.command("status")
def server_status(recipe_path: RecipeArgument = QUICKSTART_RECIPE) -> None:
    """Say whether the project's Prefect server runs, where, and which processes hold it."""
    from tuneline.flows.server import idle_seconds, live_leases, recorded_server

    home = Path(read_recipe(recipe_path, None).work_dir).resolve() / "prefect"
    record = recorded_server(home)
    if record is None:
        typer.echo(f"no Prefect server runs for {home.parent}")
        return
    holders = sorted({lease.name.split("-")[0] for lease in live_leases(home)})
    typer.echo(
        f"Prefect server {record['url'].removesuffix('/api')} (pid {record['pid']}); "
        f"held by: {', '.join(holders) or 'nobody'}; stops after {idle_seconds():.0f} s idle"
    )


@server_app.command("stop")
def server_stop(recipe_path: RecipeArgument = QUICKSTART_RECIPE) -> None:
    """Stop the project's Prefect server now (a run still using it loses its connection)."""
    from tuneline.flows.server import stop_server

    record = stop_server(Path(read_recipe(recipe_path, None).work_dir) / "prefect")
    typer.echo(
        f"stopped the Prefect server at {record['url']}" if record else "no Prefect server was running"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
