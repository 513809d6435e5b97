"""`tuneline export MODEL --format merged|adapter|gguf --to DIR`: a registered version, a train
stage or a model folder as files plain transformers, peft, llama.cpp or Ollama load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneline.cli.options import DEFAULT_ARTIFACTS_DIR, fail
from tuneline.errors import UserError
from tuneline.objectstore import open_artifacts
from tuneline.recipe import RecipeError, load_recipe


def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@champion (or @candidate), models:/NAME/VERSION, a train stage folder "
            "or a model folder."
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="merged (safetensors for transformers), adapter (peft, with its base reference) or "
            "gguf (llama.cpp, Ollama Modelfile beside it).",
        ),
    ],
    to: Annotated[Path, typer.Option(help="Folder to write; its parent must exist.")],
    recipe: Annotated[
        Path | None,
        typer.Option(help="Recipe whose artifacts_dir, register.tracking_uri and model name to use."),
    ] = None,
    artifacts_dir: Annotated[
        Path | None, typer.Option(help="The recipe's artifacts_dir (default .tuneline).")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store of registered models; default sqlite:///<artifacts-dir>/mlflow.db."),
    ] = None,
    quantize: Annotated[str | None, typer.Option(help="GGUF type: f32, f16, bf16 or q8_0 (default).")] = None,
    llama_cpp: Annotated[
        Path | None,
        typer.Option(
            envvar="LLAMA_CPP_DIR",
            help="A llama.cpp checkout whose convert_hf_to_gguf.py to run; default: the copy in the "
            "llama-cpp-python sdist, downloaded once with pip into ~/.cache/tuneline.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a folder that is not empty.")] = False,
) -> None:
    """Export a trained model: merged safetensors, a peft adapter, or GGUF with an Ollama Modelfile.

    The folder is written whole or not at all, with export.json (files and sha256); the registered
    version is tagged `tuneline.exported`."""
    from tuneline.register.export import export_model
    from tuneline.register.serve import resolve_model

    model_name = None
    if recipe is not None:
        try:
            loaded = load_recipe(recipe)
        except RecipeError as error:
            raise fail(str(error)) from None
        try:
            artifacts_dir = artifacts_dir or open_artifacts(loaded.artifacts_dir, loaded.work_dir)
        except UserError as error:  # an object store that cannot be reached
            raise fail(error) from None
        tracking_uri = tracking_uri or loaded.register.tracking_uri
        model_name = loaded.register.model_name
    artifacts_dir = artifacts_dir or DEFAULT_ARTIFACTS_DIR
    uri = tracking_uri or f"sqlite:///{artifacts_dir}/mlflow.db"
    try:
        resolved = resolve_model(model, artifacts_dir, uri)
        typer.echo(f"Exporting {resolved.label} as {fmt} to {to}...")
        done = export_model(
            resolved,
            fmt,
            to,
            artifacts_dir=artifacts_dir,
            tracking_uri=uri,
            quantize=quantize,
            llama_cpp_dir=llama_cpp,
            force=force,
            registered_name=model_name,
        )
    except UserError as error:
        raise fail(error) from None
    typer.echo(f"Wrote {len(done['files'])} files to {done['to']} (export.json lists them with sha256).")
    if done["tagged"]:
        typer.echo(f"Tagged {', '.join(done['tagged'])} as exported.")
    if fmt == "gguf":
        typer.echo(f"Ollama: cd {done['to']} && ollama create NAME -f Modelfile")
