"""Serving a model over an OpenAI-compatible API, through a well-kept server rather than our own.

`tuneline serve MODEL` resolves MODEL (a registered version by alias or number, a train stage
folder, or a model folder) to a local model folder, then starts `transformers serve` (CPU or one
GPU) or `vllm serve` (CUDA) on it as a child process. The server brings the HTTP layer:
/v1/chat/completions (streaming too), /v1/completions, /v1/models and /health, with the model's
own chat template and its generation config's stop tokens. A registered version is served from
its train stage's folder when this artifacts folder still holds it (the version's
`tuneline.train_digest` tag), else from the version's model downloaded once from MLflow.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuneline.errors import UserError

ENGINES = ("transformers", "vllm")
API_KEY_ENV = "TUNELINE_SERVE_API_KEY"
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
# uvicorn's start-up line; with port 0 it names the port the OS chose.
RUNNING = re.compile(r"running on (?P<url>https?://\S+)", re.IGNORECASE)
START_TIMEOUT_S = 300.0  # SmolLM2-135M loads in ~10-50 s on two busy cores; a 1B model longer


@dataclass(frozen=True)
class ServedModel:
    """What a MODEL argument resolved to: the local folder to serve and words for people; where
    it came from for exports (the train stage folder when the store holds it, its digest, and the
    registered name and version)."""

    folder: Path
    label: str
    stage_dir: Path | None = None
    train_digest: str | None = None
    model_name: str | None = None
    version: str | None = None


def resolve_model(model: str, artifacts_dir: str | Path, tracking_uri: str) -> ServedModel:
    """The local model folder for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a train stage
    folder or a model folder; a name, alias, version or path that does not exist is a UserError
    saying what does."""
    match = REGISTERED.match(model)
    if match:
        return registered_model(match["name"], match["alias"], match["version"], artifacts_dir, tracking_uri)
    if model.startswith("models:/"):
        raise UserError(
            f"MODEL {model}: not a registered model reference; write models:/NAME@ALIAS "
            "(e.g. models:/tiny-chat@champion) or models:/NAME/VERSION (e.g. models:/tiny-chat/3)"
        )
    return folder_model(Path(model))


def folder_model(path: Path) -> ServedModel:
    """A model folder (config.json or a peft adapter) or a train stage folder (its model/adapter)."""
    from tuneline.models import trained_folder

    if (path / "manifest.json").is_file() and path.parent.name == "train":
        stage_dir = path.resolve()
        return ServedModel(trained_folder(stage_dir), str(path), stage_dir, stage_dir.name)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return ServedModel(path.resolve(), str(path))
    raise UserError(
        f"MODEL {path}: not a model folder (no config.json or adapter_config.json) nor a train stage "
        "folder; give models:/NAME@champion, a train stage folder (<artifacts_dir>/stages/train/<digest>) "
        "or a folder written by save_pretrained"
    )


def registered_model(
    name: str, alias: str | None, version: str | None, artifacts_dir: str | Path, tracking_uri: str
) -> ServedModel:
    """A registered version's folder: its train stage's when this store holds it, else downloaded."""
    import mlflow

    from tuneline.models import trained_folder
    from tuneline.register.champion import TRAIN_DIGEST_TAG, downloaded_model, store_exists
    from tuneline.store import find_stage

    if not store_exists(tracking_uri):
        raise UserError(
            f"--tracking-uri {tracking_uri}: no MLflow store there; give the store the model was "
            "registered in (a recipe's register.tracking_uri)"
        )
    client = mlflow.MlflowClient(tracking_uri)
    versions, aliases = registry_listing(client, name)
    wanted = aliases.get(alias) if alias else version
    if wanted not in versions:
        missing = f"alias @{alias}" if alias else f"version {version}"
        raise UserError(missing_message(name, missing, versions, aliases, client))
    mlflow.set_tracking_uri(tracking_uri)  # downloaded_model reads the current tracking store
    digest = client.get_model_version(name, wanted).tags.get(TRAIN_DIGEST_TAG)
    stage = find_stage(artifacts_dir, "train", digest) if digest else None
    folder = trained_folder(stage.dir) if stage else downloaded_model(artifacts_dir, name, wanted)
    label = f"{name} version {wanted}" + (f" (@{alias})" if alias else "")
    return ServedModel(Path(folder).resolve(), label, stage.dir if stage else None, digest, name, wanted)


def registry_listing(client: object, name: str) -> tuple[list[str], dict[str, str]]:
    """A registered model's version numbers and its aliases (alias -> version); empty when the
    name is not registered."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return [], {}
        raise
    versions = sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)
    return [str(v) for v in versions], {a: str(v) for a, v in registered.aliases.items()}


def missing_message(
    name: str, wanted: str, versions: list[str], aliases: dict[str, str], client: object
) -> str:
    """What exists instead of a missing model, alias or version."""
    if not versions:
        known = sorted(m.name for m in client.search_registered_models())
        return (
            f"MODEL models:/{name}: no registered model named {name!r}; registered models: "
            f"{', '.join(known) or 'none'}"
        )
    listed = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"MODEL models:/{name}: no {wanted}; its versions: {', '.join(versions)}; aliases: {listed}"


def server_command(
    served: ServedModel,
    *,
    engine: str = "transformers",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    continuous_batching: bool = False,
) -> list[str]:
    """The command line of the server for `served`: `transformers serve` or `vllm serve`.

    transformers serve has no API key check, so a key is refused with it rather than ignored.
    """
    folder = str(served.folder)
    if engine == "vllm":
        check_vllm()
        command = ["vllm", "serve", folder, "--host", host, "--port", str(port)]
        return command + (["--api-key", api_key] if api_key else [])
    if engine != "transformers":
        raise UserError(f"--engine {engine}: unknown engine; use one of {', '.join(ENGINES)}")
    if api_key:
        raise UserError(
            f"--api-key (or {API_KEY_ENV}): transformers serve checks no API key; serve on 127.0.0.1 "
            "(the default) and put an authenticating reverse proxy in front, or use --engine vllm on a "
            "CUDA machine, which checks it"
        )
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder]
    command += ["--host", host, "--port", str(port), "--log-level", "warning"]
    return command + (["--continuous-batching"] if continuous_batching else [])


def check_vllm() -> None:
    """vLLM serves only where it is installed with a CUDA device; say which one is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "--engine vllm: vLLM is not installed here; on a CUDA machine `pip install vllm`, "
            "or serve with --engine transformers (CPU or one GPU)"
        )
    import torch

    if not torch.cuda.is_available():
        raise UserError("--engine vllm: no CUDA device here; vLLM needs one. Use --engine transformers")


@contextmanager
def running_server(
    command: list[str], *, echo: Callable[[str], None] = lambda line: None, timeout_s: float = START_TIMEOUT_S
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, wait for its 'running on' line, yield (base URL, process); stop it after.

    Every output line goes to `echo`. A server that exits or stays silent past `timeout_s` is a
    UserError carrying the end of its output.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    started, tail, url = threading.Event(), collections.deque(maxlen=20), []

    def relay() -> None:
        for line in process.stdout:
            echo(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))
            if not started.is_set() and (found := RUNNING.search(line)):
                url.append(found["url"])
                started.set()
        started.set()  # the output ended: the server exited

    threading.Thread(target=relay, daemon=True).start()
    try:
        if not started.wait(timeout_s) or not url:
            raise UserError(f"the server did not start ({command[0]} ...): " + " | ".join(tail))
        yield url[0], process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Ask the server to stop (SIGTERM: uvicorn finishes its requests), then make it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
