"""GGUF exports through llama.cpp's own converter, and the Ollama Modelfile beside the file.

llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and its own `gguf-py/`) is not
a module on PyPI. It comes from a llama.cpp checkout the user names (--llama-cpp DIR or
LLAMA_CPP_DIR), else from the llama.cpp copy vendored in the pinned llama-cpp-python sdist, which
pip downloads once into ~/.cache/tuneline/llama.cpp/<version> (sha256 checked, unpacked whole or
not at all). It runs as a child process with this Python, so it uses the installed torch,
transformers and sentencepiece.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import tuneline
from tuneline.errors import UserError
from tuneline.store import sha256_file

LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
# llama-cpp-python's sdist vendors llama.cpp with its converter, `conversion/` and `gguf-py/`.
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
UNKNOWN_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ollama's ChatML template (Go template syntax); a default system prompt becomes SYSTEM.
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def converter_dir(llama_cpp_dir: str | Path | None, cache_dir: str | Path | None) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py: the user's checkout when named, else
    the copy from the pinned llama-cpp-python sdist, fetched once into the cache."""
    if llama_cpp_dir:
        folder = Path(llama_cpp_dir).expanduser()
        if not (folder / CONVERTER).is_file():
            raise UserError(
                f"--llama-cpp {folder} (or {LLAMA_CPP_ENV}): no {CONVERTER} there; give the root of a "
                "llama.cpp checkout, or leave it out to use llama-cpp-python's copy"
            )
        return folder
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "llama.cpp" / LLAMA_CPP_PYTHON
    if not (folder / CONVERTER).is_file():
        fetch_converter(folder)
    return folder


def default_cache_dir() -> Path:
    """~/.cache/tuneline (or $XDG_CACHE_HOME/tuneline)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneline"


def fetch_converter(folder: Path) -> None:
    """Download the pinned llama-cpp-python sdist with pip, check its sha256, and unpack its
    llama.cpp converter into `folder` (whole, or not at all)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as scratch:
        pinned = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--disable-pip-version-check", "-q", "-d", scratch, pinned]
        done = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise UserError(
                f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON} (for llama.cpp's GGUF converter) "
                f"with pip: {done.stderr.strip()[-500:]}; give a llama.cpp checkout with --llama-cpp DIR "
                f"or {LLAMA_CPP_ENV}"
            )
        if (found := sha256_file(sdists[0])) != LLAMA_CPP_PYTHON_SHA256:
            raise UserError(
                f"{sdists[0].name}: sha256 {found}, expected {LLAMA_CPP_PYTHON_SHA256}; the package index "
                f"served another file. Give a llama.cpp checkout with --llama-cpp DIR or {LLAMA_CPP_ENV}"
            )
        unpacked = Path(scratch) / "llama.cpp"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.removeprefix(prefix).startswith(VENDORED)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            archive.extractall(unpacked, members=members, filter="data")
        (unpacked / "SOURCE").write_text(
            f"llama.cpp as vendored in llama-cpp-python {LLAMA_CPP_PYTHON} (sdist sha256 "
            f"{LLAMA_CPP_PYTHON_SHA256})\n",
            encoding="utf-8",
        )
        try:
            unpacked.rename(folder)
        except OSError:
            if not (folder / CONVERTER).is_file():  # another export unpacked it first: keep theirs
                raise


def convert_to_gguf(converter: Path, source: Path, out_path: Path, outtype: str, label: str) -> None:
    """Run llama.cpp's converter on the merged model folder with this Python; a model it refuses
    is a UserError that says why."""
    command = [sys.executable, str(converter / CONVERTER), str(source), "--outfile", str(out_path)]
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # its own gguf-py
    done = subprocess.run([*command, "--outtype", outtype], capture_output=True, text=True, env=env)
    if done.returncode == 0 and out_path.is_file():
        return
    output = done.stdout + done.stderr
    if UNKNOWN_PRE_TOKENIZER in output:
        raise UserError(
            f"MODEL {label}: llama.cpp's GGUF converter ({converter}) does not know this model's "
            "BPE pre-tokenizer: the tokenizer was trained or changed locally, or the model is newer than "
            "this llama.cpp. GGUF needs a tokenizer llama.cpp lists (convert_hf_to_gguf_update.py); give a "
            f"newer llama.cpp checkout with --llama-cpp DIR, or export --format merged"
        )
    lines = [line for line in output.splitlines() if line.strip()][-8:]
    raise UserError(f"MODEL {label}: llama.cpp's GGUF converter failed: " + " | ".join(lines))


def ollama_modelfile(source: Path, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file: TEMPLATE and SYSTEM for ChatML chat templates, the
    Jinja template as a comment otherwise, and the model's stop tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    system = chatml_default_system(tokenizer)
    lines = [f"# Written by Tuneline {tuneline.__version__}: `ollama create NAME -f Modelfile` here.", ""]
    lines.append(f"FROM ./{gguf_name}")
    if system is not None:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    elif tokenizer.chat_template:
        lines += [
            "# The chat template is not ChatML, so no TEMPLATE is written: Ollama uses the GGUF file's",
            "# tokenizer.chat_template when it knows it; else write a TEMPLATE (Go template syntax) from:",
            *(f"#   {line}" for line in str(tokenizer.chat_template).splitlines()),
        ]
    stops = stop_tokens(tokenizer, source, chatml=system is not None)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def chatml_default_system(tokenizer: Any) -> str | None:
    """The default system prompt ("" when none) if the chat template renders ChatML, else None."""
    turns = [("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")]
    expected = "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns)
    expected += f"{IM_START}assistant\n"
    try:
        full = render(tokenizer, [{"role": role, "content": text} for role, text in turns])
        alone = render(tokenizer, [{"role": "user", "content": "U"}])
    except Exception:  # noqa: BLE001 - a template that cannot render these turns is not ChatML
        return None
    user = f"{IM_START}user\nU{IM_END}\n{IM_START}assistant\n"
    if full != expected or not alone.endswith(user):
        return None
    prefix = alone.removesuffix(user)
    found = re.fullmatch(rf"{re.escape(IM_START)}system\n(.*){re.escape(IM_END)}\n", prefix, re.DOTALL)
    return found[1] if found else ("" if not prefix else None)


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template's text for `messages`, with the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_tokens(tokenizer: Any, source: Path, *, chatml: bool) -> list[str]:
    """The generation config's eos tokens, the tokenizer's, and ChatML's turn markers."""
    config_path = source / "generation_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids = config.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids] + [tokenizer.eos_token]
    tokens += [IM_START, IM_END] if chatml else []
    return list(dict.fromkeys(t for t in tokens if t))
