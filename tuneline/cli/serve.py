"""`tuneline serve MODEL`: a registered version, train stage or model folder behind an
OpenAI-compatible API (`transformers serve`, or `vllm serve` on CUDA), until Ctrl-C."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from tuneline.cli.options import DEFAULT_ARTIFACTS_DIR, ArtifactsDir, fail
from tuneline.errors import UserError
from tuneline.register.serve import API_KEY_ENV, ENGINES, resolve_model, running_server, server_command


def serve_command(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@champion (or @candidate), models:/NAME/VERSION, a train stage folder "
            "or a model folder."
        ),
    ],
    artifacts_dir: ArtifactsDir = DEFAULT_ARTIFACTS_DIR,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store of registered models; default sqlite:///<artifacts-dir>/mlflow.db."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the model.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 lets the OS choose one (printed).")] = 8000,
    engine: Annotated[
        str, typer.Option(help=f"Server: {' or '.join(ENGINES)} (CUDA only).")
    ] = "transformers",
    api_key: Annotated[
        str | None,
        typer.Option(envvar=API_KEY_ENV, help="Key clients must send (vllm only: transformers checks none)."),
    ] = None,
    continuous_batching: Annotated[
        bool, typer.Option(help="Batch concurrent requests as they come (transformers engine).")
    ] = True,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models, /health) with its own chat template and stop tokens, until Ctrl-C."""
    uri = tracking_uri or f"sqlite:///{artifacts_dir}/mlflow.db"
    try:
        served = resolve_model(model, artifacts_dir, uri)
        command = server_command(
            served,
            engine=engine,
            host=host,
            port=port,
            api_key=api_key,
            continuous_batching=continuous_batching,
        )
    except UserError as error:
        raise fail(error) from None
    typer.echo(f"Serving {served.label} from {served.folder} with {engine} serve...")
    # SIGTERM ends this process like Ctrl-C does: the server child is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with running_server(command, echo=lambda line: typer.echo(line, err=True)) as (url, process):
            typer.echo(f"OpenAI base_url: {url}/v1   model: {served.folder}   (Ctrl-C stops)")
            code = process.wait()
    except KeyboardInterrupt:
        return
    except UserError as error:
        raise fail(error) from None
    if code != 0:
        raise typer.Exit(1)  # the server stopped by itself; its output above says why
