"""`tuneline export`: a trained model as files other tools load without Tuneline.

Three formats, each written from what the train stage already saved (nothing is merged again):
- `merged`: the merged safetensors model with its tokenizer, chat template and generation config,
  for plain `AutoModelForCausalLM`; soft-prompt methods have no merged form.
- `adapter`: the peft adapter with its base reference (`base_model_name_or_path`, a hub name or
  the base folder), and a README saying how to load it or point it at another base.
- `gguf`: llama.cpp's own converter (`convert_hf_to_gguf.py`) run on the merged model, with an
  Ollama `Modelfile` beside the file. The converter is not a module on PyPI: it comes from the
  llama.cpp copy inside the pinned llama-cpp-python sdist (fetched once with pip into
  ~/.cache/tuneline/llama.cpp/<version>, sha256 checked), or from a llama.cpp checkout the user
  names (--llama-cpp DIR or LLAMA_CPP_DIR).

Every export is written into a temporary folder beside DIR and renamed into place, so a crash
leaves no half-written DIR; `export.json` lists the files with their sha256. The registered
version gets the `tuneline.exported` tag, and `<artifacts_dir>/exports.jsonl` gets a line per
export, which the retention flow reads to keep exported train stages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tuneline
from tuneline.errors import UserError
from tuneline.register.gguf_export import convert_to_gguf, converter_dir, ollama_modelfile
from tuneline.register.serve import ServedModel
from tuneline.store import sha256_file

FORMATS = ("merged", "adapter", "gguf")
# What llama.cpp's converter writes by itself; k-quants (q4_K_M ...) need its llama-quantize binary.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPE = "q8_0"
EXPORT_FILE = "export.json"
EXPORTS_LEDGER = "exports.jsonl"


def export_model(
    model: ServedModel,
    fmt: str,
    to: str | Path,
    *,
    artifacts_dir: str | Path,
    tracking_uri: str | None = None,
    quantize: str | None = None,
    llama_cpp_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    registered_name: str | None = None,
) -> dict[str, Any]:
    """Write `model` to folder `to` in format `fmt`, record the export, return export.json's content.

    `registered_name` (the recipe's register.model_name) finds the registered versions of a train
    stage given as a folder, so they are tagged as exported too.
    """
    check_format(fmt, quantize)
    target = check_target(Path(to), force)
    source = adapter_folder(model) if fmt == "adapter" else merged_folder(model)
    if target == source or target in source.parents:
        raise UserError(f"--to {target}: that folder holds the model being exported; give another folder")
    converter = None
    with staged_folder(target) as scratch:
        if fmt == "gguf":
            converter = converter_dir(llama_cpp_dir, cache_dir)
            outtype = quantize or DEFAULT_GGUF_TYPE
            gguf_name = f"{slug(model)}-{outtype}.gguf"
            convert_to_gguf(converter, source, scratch / gguf_name, outtype, model.label)
            (scratch / "Modelfile").write_text(ollama_modelfile(source, gguf_name), encoding="utf-8")
        else:
            copy_files(source, scratch)
        if fmt == "adapter":
            write_adapter_readme(scratch, model, target)
        manifest = export_manifest(model, fmt, quantize, source, scratch, converter)
        (scratch / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest["to"] = str(target)
    manifest["tagged"] = record_export(manifest, artifacts_dir, tracking_uri, registered_name)
    return manifest


def check_format(fmt: str, quantize: str | None) -> None:
    """A format and GGUF type that can be written, or a UserError naming the ones that can."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format; use one of {', '.join(FORMATS)}")
    if quantize is not None and fmt != "gguf":
        raise UserError(
            f"--quantize {quantize}: only GGUF exports are quantized; drop it or use --format gguf"
        )
    if quantize is not None and quantize not in GGUF_TYPES:
        raise UserError(
            f"--quantize {quantize}: llama.cpp's converter writes {', '.join(GGUF_TYPES)}; for k-quants "
            "(q4_K_M ...) export f16 and run llama.cpp's llama-quantize on the file"
        )


def check_target(target: Path, force: bool) -> Path:
    """The absolute export folder (its parents are created): empty unless `force`."""
    target = target.expanduser().absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"--to {target}: cannot create its parent folder {target.parent} ({error.strerror}); "
            "give a folder path you can write to"
        ) from None
    if target.exists() and not target.is_dir():
        raise UserError(f"--to {target}: a file is in the way; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(
            f"--to {target}: the folder is not empty; give another folder or --force to replace it"
        )
    return target


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed into place when the block ends without error
    (an earlier `target` is replaced whole); removed when it fails."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-export-", dir=target.parent))
    try:
        yield scratch
        scratch.chmod(0o777 & ~current_umask())  # not mkdtemp's (or a copied stage folder's) 0700
        old = target.parent / f"{scratch.name}-old"
        if target.exists():
            target.rename(old)
        scratch.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def method_name(model: ServedModel, otherwise: str) -> str:
    """The training method the train stage recorded (`otherwise` without one), for errors."""
    stats = model.stage_dir / "stats.json" if model.stage_dir else None
    if stats and stats.is_file():
        method = json.loads(stats.read_text(encoding="utf-8")).get("method")
        return str(method.get("name") if isinstance(method, dict) else method)
    return otherwise


def merged_folder(model: ServedModel) -> Path:
    """The merged model the train stage saved (`model/`), or a UserError for soft prompts."""
    folder = model.stage_dir / "model" if model.stage_dir else model.folder
    if (folder / "config.json").is_file():
        return folder
    raise UserError(
        f"MODEL {model.label}: trained with {method_name(model, 'a soft-prompt method')}, which has no "
        "merged model (the soft prompt is applied as the model runs; hence no GGUF either); export it "
        "with --format adapter and load it on its base with peft"
    )


def adapter_folder(model: ServedModel) -> Path:
    """The peft adapter the train stage saved (`adapter/`), or a UserError for full fine-tuning."""
    folder = model.stage_dir / "adapter" if model.stage_dir else model.folder
    if (folder / "adapter_config.json").is_file():
        return folder
    raise UserError(
        f"MODEL {model.label}: trained with {method_name(model, 'full fine-tuning')}, which leaves no "
        "adapter (all weights changed); export it with --format merged"
    )


def copy_files(source: Path, scratch: Path) -> None:
    """Copy a model folder's files (copies, not links: writing into the export must not change
    the train stage)."""
    shutil.copytree(source, scratch, dirs_exist_ok=True)


def write_adapter_readme(scratch: Path, model: ServedModel, target: Path) -> None:
    """Say where the adapter's base is and how to load it (replaces peft's empty model card)."""
    config_path = scratch / "adapter_config.json"
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    local = Path(base).is_absolute() or base.startswith(".")
    if local and not (Path(base) / "config.json").is_file():
        raise UserError(
            f"MODEL {model.label}: the adapter's base model folder {base} (adapter_config.json "
            "base_model_name_or_path) no longer exists; run the recipe again to rebuild it, or export "
            "--format merged"
        )
    where = (
        f"the local folder `{base}` (a Tuneline stage folder: copy it along, or point the adapter at the "
        "hub name it came from)"
        if local
        else f"the hub model `{base}`"
    )
    text = f"""---
base_model: {base}
library_name: peft
---
# {model.label}: peft adapter

Exported by Tuneline {tuneline.__version__}. The base model is {where}.

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{target}")
tokenizer = AutoTokenizer.from_pretrained("{target}")
```

The base is found through `base_model_name_or_path` in `adapter_config.json`. To use a base kept
elsewhere, set that field to a hub name or a folder holding the same base model (config.json and
weights), or load the base yourself and call `PeftModel.from_pretrained(base, "{target}")`.
`export.json` lists every file with its sha256.
"""
    (scratch / "README.md").write_text(text, encoding="utf-8")


def slug(model: ServedModel) -> str:
    """A file name stem for the model: NAME-vVERSION when registered, else the train digest."""
    if model.model_name:
        return re.sub(r"[^\w.-]+", "-", f"{model.model_name}-v{model.version}")
    return f"train-{model.train_digest}" if model.train_digest else "model"


def export_manifest(
    model: ServedModel, fmt: str, quantize: str | None, source: Path, scratch: Path, converter: Path | None
) -> dict[str, Any]:
    """export.json: what was exported, from where, and every file with its sha256."""
    files = sorted(p for p in scratch.rglob("*") if p.is_file())
    return {
        "model": model.label,
        "model_name": model.model_name,
        "version": model.version,
        "train_digest": model.train_digest,
        "stage_dir": str(model.stage_dir) if model.stage_dir else None,
        "format": fmt,
        "quantize": (quantize or DEFAULT_GGUF_TYPE) if fmt == "gguf" else None,
        "source": str(source),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tuneline_version": tuneline.__version__,
        "converter": str(converter) if converter else None,
        "files": {str(p.relative_to(scratch)): sha256_file(p) for p in files},
    }


def record_export(
    manifest: dict[str, Any], artifacts_dir: str | Path, tracking_uri: str | None, registered_name: str | None
) -> list[str]:
    """Tag the exported registered versions and append a line to `exports.jsonl` in the train
    stage's store (every export of a train stage, registered or not: retention keeps what it
    lists), else in `artifacts_dir`. Returns
    the tagged versions as models:/NAME/VERSION."""
    quantize = f" {manifest['quantize']}" if manifest["quantize"] else ""
    detail = f"{manifest['format']}{quantize} -> {manifest['to']} at {manifest['exported_at']}"
    versions = exported_versions(manifest, tracking_uri, registered_name)
    if versions:
        import mlflow

        from tuneline.register.run_details import EXPORTED_TAG

        client = mlflow.MlflowClient(tracking_uri)
        for name, version in versions:
            client.set_model_version_tag(name, version, EXPORTED_TAG, detail)
    if manifest["train_digest"]:
        store = Path(manifest["stage_dir"]).parents[2] if manifest["stage_dir"] else Path(artifacts_dir)
        line = {
            "train_digest": manifest["train_digest"],
            "model_name": versions[0][0] if versions else None,
            "version": versions[0][1] if versions else None,
            "format": manifest["format"],
            "to": manifest["to"],
            "at": manifest["exported_at"],
        }
        store.mkdir(parents=True, exist_ok=True)
        with (store / EXPORTS_LEDGER).open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(line) + "\n")  # one write of one short line: appends stay whole
    return [f"models:/{name}/{version}" for name, version in versions]


def exported_versions(
    manifest: dict[str, Any], tracking_uri: str | None, registered_name: str | None
) -> list[tuple[str, str]]:
    """The registered version exported, or for a train stage folder, the versions of
    `registered_name` registered from that train stage."""
    if manifest["model_name"]:
        return [(manifest["model_name"], manifest["version"])]
    if not (registered_name and manifest["train_digest"] and tracking_uri):
        return []
    from tuneline.register.champion import TRAIN_DIGEST_TAG, store_exists

    if not store_exists(tracking_uri):
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.search_model_versions(f"name='{registered_name}'")
    return sorted(
        ((v.name, str(v.version)) for v in found if v.tags.get(TRAIN_DIGEST_TAG) == manifest["train_digest"]),
        key=lambda pair: int(pair[1]),
    )
