"""`tuneline export`: merged, adapter and GGUF exports of a registered version or a train stage,
written whole or not at all, tagged in the registry; and `mlflow models serve` on the registered
"models from code" model.

The GGUF tests run llama.cpp's own converter, fetched once from the pinned llama-cpp-python sdist
into the pytest cache (`.pytest_cache`), so only the first session downloads it (~75 MB, ~10 s).
It refuses the byte-level BPE tokenizers that `make_tiny_model` trains (their pre-tokenizer hash is
unknown to it), so the GGUF round trip uses a tiny Llama with a Llama-style (sentencepiece-like,
byte-fallback) BPE tokenizer trained here, which it converts like Llama 2's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from register_fixtures import CONVERSATIONS, MODEL_NAME, registered_store
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.models import CHATML_TEMPLATE
from tuneline.register.gguf_export import converter_dir
from tuneline.register.run_details import EXPORTED_TAG
from tuneline.store import find_stage, sha256_file, write_stage

PROMPT = [{"role": "user", "content": "where is my refund?"}]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A store with the tiny model registered as version 1 (@champion) from train stage t-first."""
    return registered_store(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def llama_cpp(pytestconfig) -> Path:
    """llama.cpp's converter from the pinned llama-cpp-python sdist, fetched once into the pytest cache."""
    return converter_dir(None, pytestconfig.cache.mkdir("tuneline-llama-cpp"))


def export(*args: str, store: Path | None = None, uri: str | None = None):
    """`tuneline export ...` as a user types it."""
    options = ["--artifacts-dir", str(store), "--tracking-uri", uri] if store else []
    return CliRunner().invoke(app, ["export", *args, *options])


def greedy_ids(model, input_ids: torch.Tensor, tokens: int = 12) -> list[int]:
    return model.generate(input_ids, max_new_tokens=tokens, do_sample=False)[0].tolist()


def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def fake_train_stage(store: Path, digest: str, method: str, folders: dict[str, Path]) -> Path:
    """A finished train stage holding copies of `folders` (model/, adapter/) and its method."""
    import shutil

    with write_stage(store, "train", digest) as writer:
        for name, source in folders.items():
            shutil.copytree(source, writer.path(name))
        writer.stats = {"method": {"name": method}}
    return find_stage(store, "train", digest).dir


def test_merged_export_loads_with_plain_transformers_and_tags_the_version(registered, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, uri = registered["store"], registered["tracking_uri"]
    target = tmp_path / "merged"
    result = export(
        f"models:/{MODEL_NAME}@champion", "--format", "merged", "--to", str(target), store=store, uri=uri
    )
    assert result.exit_code == 0, result.output
    assert f"Tagged models:/{MODEL_NAME}/1 as exported" in result.output
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert {"chat_template.jinja", "export.json"} <= names
    manifest = json.loads((target / "export.json").read_text())
    assert (manifest["format"], manifest["model_name"], manifest["version"]) == ("merged", MODEL_NAME, "1")
    assert manifest["train_digest"] == "t-first"
    assert manifest["files"]["model.safetensors"] == sha256_file(target / "model.safetensors")

    source = find_stage(store, "train", "t-first").dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(target)
    ids = prompt_ids(tokenizer)
    exported, original = (
        AutoModelForCausalLM.from_pretrained(target),
        AutoModelForCausalLM.from_pretrained(source),
    )
    assert torch.equal(exported(ids).logits, original(ids).logits)

    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    tag = mlflow.MlflowClient(uri).get_model_version(MODEL_NAME, "1").tags[EXPORTED_TAG]
    assert tag.startswith(f"merged -> {target} at 20")
    ledger = [json.loads(line) for line in (store / "exports.jsonl").read_text().splitlines()]
    assert {
        "train_digest": "t-first",
        "version": "1",
        "format": "merged",
        "to": str(target),
    }.items() <= ledger[-1].items()

    shown = CliRunner().invoke(
        app,
        [
            "runs",
            "show",
            f"models:/{MODEL_NAME}/1",
            "--artifacts-dir",
            str(store),
            "--tracking-uri",
            uri,
            "--json",
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["export"] == {"exported": True, "detail": tag}


def test_a_train_stage_exported_by_folder_tags_the_versions_registered_from_it(registered, tmp_path):
    from tuneline.register.export import export_model
    from tuneline.register.serve import resolve_model

    store, uri = registered["store"], registered["tracking_uri"]
    stage = resolve_model(str(find_stage(store, "train", "t-first").dir), store, uri)
    done = export_model(
        stage, "merged", tmp_path / "out", artifacts_dir=store, tracking_uri=uri, registered_name=MODEL_NAME
    )
    assert done["tagged"] == [f"models:/{MODEL_NAME}/1"]
    tag = mlflow.MlflowClient(uri).get_model_version(MODEL_NAME, "1").tags[EXPORTED_TAG]
    assert tag.startswith(f"merged -> {tmp_path / 'out'} at ")


def test_a_folder_that_is_not_empty_is_kept_unless_forced(registered, tmp_path):
    store, uri = registered["store"], registered["tracking_uri"]
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    args = (f"models:/{MODEL_NAME}/1", "--format", "merged", "--to", str(target))
    refused = export(*args, store=store, uri=uri)
    assert refused.exit_code == 2
    assert f"--to {target}: the folder is not empty; give another folder or --force" in refused.output
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    forced = export(*args, "--force", store=store, uri=uri)
    assert forced.exit_code == 0, forced.output
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary or old folder left


def test_a_failed_export_leaves_no_folder_behind(registered, tmp_path, monkeypatch):
    from tuneline.register import export as export_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "export_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        export_module.export_model(
            export_module.ServedModel(registered["store"] / "tiny-model", "tiny"),
            "merged",
            tmp_path / "out",
            artifacts_dir=registered["store"],
        )
    assert list(tmp_path.iterdir()) == []


def test_exporting_over_the_models_own_folder_is_refused_even_with_force(registered):
    store, uri = registered["store"], registered["tracking_uri"]
    own = find_stage(store, "train", "t-first").dir / "model"
    result = export(
        f"models:/{MODEL_NAME}/1", "--format", "merged", "--to", str(own), "--force", store=store, uri=uri
    )
    assert result.exit_code == 2
    assert f"--to {own}: that folder holds the model being exported" in " ".join(result.output.split())
    assert (own / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        (f"models:/{MODEL_NAME}@prod", (), "no alias @prod; its versions: 1; aliases: @candidate -> 1"),
        (
            f"models:/{MODEL_NAME}/1",
            ("--to", "/dev/null/out/model"),
            "cannot create its parent folder /dev/null/out (Not a directory)",
        ),
        (
            f"models:/{MODEL_NAME}/1",
            ("--format", "onnx"),
            "--format onnx: unknown format; use one of merged, adapter",
        ),
        (
            f"models:/{MODEL_NAME}/1",
            ("--quantize", "q8_0"),
            "--quantize q8_0: only GGUF exports are quantized",
        ),
        (
            f"models:/{MODEL_NAME}/1",
            ("--format", "gguf", "--quantize", "q4_K_M"),
            "llama.cpp's converter writes f32, f16, bf16, q8_0; for k-quants",
        ),
        (
            f"models:/{MODEL_NAME}/1",
            ("--format", "adapter"),
            "leaves no adapter (all weights changed); export it",
        ),
        (
            f"models:/{MODEL_NAME}/1",
            ("--format", "gguf", "--llama-cpp", "/nowhere"),
            "no convert_hf_to_gguf.py",
        ),
    ],
)
def test_mistakes_are_clear_errors(registered, tmp_path, model, args, message):
    options = {"--format": "merged", "--to": str(tmp_path / "out")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    line = [model, *(item for pair in (options | given).items() for item in pair)]
    result = export(*line, store=registered["store"], uri=registered["tracking_uri"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapter_stages(registered):
    """A LoRA train stage (model/ and adapter/ on the tiny base) and a prompt-tuning one (adapter/ only)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = registered["store"]
    base_dir = store / "tiny-model"
    folders = {}
    for name, config in (
        ("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
        ("prompt_tuning", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
    ):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        peft_model.save_pretrained(registered["root"] / name)
        folders[name] = registered["root"] / name
    lora = fake_train_stage(store, "t-lora", "lora", {"model": base_dir, "adapter": folders["lora"]})
    prompt = fake_train_stage(store, "t-prompt", "prompt_tuning", {"adapter": folders["prompt_tuning"]})
    return {"lora": lora, "prompt_tuning": prompt, "base": base_dir}


def test_adapter_export_loads_on_its_base_with_peft_and_is_listed_for_retention(
    registered, adapter_stages, tmp_path
):
    from peft import AutoPeftModelForCausalLM

    store = registered["store"]
    target = tmp_path / "adapter"
    result = export(str(adapter_stages["lora"]), "--format", "adapter", "--to", str(target))
    assert result.exit_code == 0, result.output
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(adapter_stages["base"])
    readme = (target / "README.md").read_text()
    assert f"The base model is the local folder `{adapter_stages['base']}`" in readme
    assert "set that field to a hub name or a folder" in readme
    model = AutoPeftModelForCausalLM.from_pretrained(target)
    assert model.peft_config["default"].r == 2

    ledger = [json.loads(line) for line in (store / "exports.jsonl").read_text().splitlines()]
    assert {
        "train_digest": "t-lora",
        "version": None,
        "format": "adapter",
        "to": str(target),
    }.items() <= ledger[-1].items()


def test_a_soft_prompt_has_no_merged_form_nor_gguf(adapter_stages, tmp_path):
    for fmt in ("merged", "gguf"):
        result = export(str(adapter_stages["prompt_tuning"]), "--format", fmt, "--to", str(tmp_path / fmt))
        assert result.exit_code == 2
        assert "trained with prompt_tuning, which has no merged model" in " ".join(result.output.split())
        assert "export it with --format adapter" in " ".join(result.output.split())


def make_llama_style_model(folder: Path) -> Path:
    """A tiny Llama whose tokenizer is a byte-fallback BPE with a Metaspace pre-tokenizer, trained
    here: the layout of Llama 2's tokenizer.json, which llama.cpp's converter reads without a hash."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "<|pad|>", "<|im_start|>", "<|im_end|>"] + [
        f"<0x{i:02X}>" for i in range(256)
    ]
    corpus = [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\nbilling<|im_end|>\n" for q in CONVERSATIONS
    ]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([str(c) for c in corpus] * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


def test_gguf_export_loads_back_and_generates_the_merged_models_tokens(registered, llama_cpp, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = make_llama_style_model(tmp_path / "llama-style")
    stage = fake_train_stage(registered["store"], "t-llama", "lora", {"model": merged})
    target = tmp_path / "gguf"
    args = [
        str(stage),
        "--format",
        "gguf",
        "--quantize",
        "f32",
        "--to",
        str(target),
        "--llama-cpp",
        str(llama_cpp),
    ]
    result = export(*args)
    assert result.exit_code == 0, result.output
    assert "ollama create NAME -f Modelfile" in result.output
    gguf_name = "train-t-llama-f32.gguf"
    manifest = json.loads((target / "export.json").read_text())
    assert set(manifest["files"]) == {gguf_name, "Modelfile"}
    assert manifest["quantize"] == "f32" and manifest["converter"] == str(llama_cpp)

    tokenizer = AutoTokenizer.from_pretrained(merged)
    loaded_tokenizer = AutoTokenizer.from_pretrained(target, gguf_file=gguf_name)
    ids = prompt_ids(tokenizer)
    assert torch.equal(prompt_ids(loaded_tokenizer), ids)
    loaded = AutoModelForCausalLM.from_pretrained(target, gguf_file=gguf_name, dtype=torch.float32)
    assert greedy_ids(loaded, ids) == greedy_ids(AutoModelForCausalLM.from_pretrained(merged), ids)

    modelfile = (target / "Modelfile").read_text()
    assert f"FROM ./{gguf_name}" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile


def test_gguf_of_a_locally_trained_byte_level_bpe_is_refused_with_the_reason(registered, llama_cpp, tmp_path):
    store, uri = registered["store"], registered["tracking_uri"]
    target = tmp_path / "gguf"
    args = [f"models:/{MODEL_NAME}/1", "--format", "gguf", "--to", str(target), "--llama-cpp", str(llama_cpp)]
    result = export(*args, store=store, uri=uri)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert (
        "llama.cpp's GGUF converter" in message and "does not know this model's BPE pre-tokenizer" in message
    )
    assert "--llama-cpp DIR, or export --format merged" in message
    assert not target.exists() and "Traceback" not in result.output


def test_a_chat_template_that_is_not_chatml_is_left_to_ollama_with_the_jinja_as_a_comment(
    registered, tmp_path
):
    import shutil

    from tuneline.register.gguf_export import ollama_modelfile

    folder = tmp_path / "llama2-style"
    shutil.copytree(registered["store"] / "tiny-model", folder)
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    text = ollama_modelfile(folder, "x.gguf")
    assert "FROM ./x.gguf" in text and 'TEMPLATE """' not in text
    assert "# The chat template is not ChatML" in text and f"#   {template}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' not in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_models_serve_answers_with_the_tuned_models_replies(registered):
    """`mlflow models serve` loads the registered "models from code" model and replies as
    generate_replies does on the same folder."""
    from tuneline.evaluate.stage import generate_replies
    from tuneline.models import load_tokenizer, load_trained
    from tuneline.recipe import ModelSpec

    folder = str(find_stage(registered["store"], "train", "t-first").dir / "model")
    expected = generate_replies(
        load_trained(folder),
        load_tokenizer(ModelSpec(name=folder)),
        CONVERSATIONS,
        max_new_tokens=6,
        batch_size=2,
    )
    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", f"models:/{MODEL_NAME}/1", "--env-manager", "local"]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = (registered["root"] / "mlflow-serve.log").open("w")
    process = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        # chat_model.predict's type hints give the model a signature: the payload is {"inputs": [...]}.
        body = json.dumps({"inputs": CONVERSATIONS}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            replies = json.load(response)["predictions"]
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert replies == expected, (registered["root"] / "mlflow-serve.log").read_text()[-2000:]
