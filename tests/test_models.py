"""Tiny local models: built from texts, reloaded through the Auto classes, chat template and masks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline import models
from tuneline.recipe import ModelSpec

CORPUS = [
    "Label the customer message with its intent.",
    "where is my order 1234? shipping_status",
    "I want my money back for the lamp refund",
    "cancel order 77 please cancel_order",
    "I forgot my password reset_password",
] * 5

CONVERSATION = [
    {"role": "system", "content": "Label the message."},
    {"role": "user", "content": "where is my order?"},
    {"role": "assistant", "content": "shipping_status"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return models.make_tiny_model(out, CORPUS, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return models.load_tokenizer(ModelSpec(name=str(tiny_dir)))


def test_tiny_model_reloads_through_auto_classes(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert tokenizer.eos_token == models.IM_END and tokenizer.pad_token == models.PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("where is my order", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_model_is_seeded(tiny_dir, tmp_path):
    again = models.make_tiny_model(
        tmp_path / "again", CORPUS, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    first = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_special_tokens_are_single_tokens(tokenizer):
    for token in (models.IM_START, models.IM_END, models.PAD):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    ("messages", "generation_prompt", "expected"),
    [
        (
            CONVERSATION,
            False,
            "<|im_start|>system\nLabel the message.<|im_end|>\n"
            "<|im_start|>user\nwhere is my order?<|im_end|>\n"
            "<|im_start|>assistant\nshipping_status<|im_end|>\n",
        ),
        (
            CONVERSATION[1:2],
            True,
            "<|im_start|>user\nwhere is my order?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            [{"role": "tool", "content": '{"status": "shipped"}'}],
            False,
            '<|im_start|>tool\n{"status": "shipped"}<|im_end|>\n',
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"name": "track", "arguments": "{}"}]}],
            False,
            '<|im_start|>assistant\n<tool_call>{"name": "track", "arguments": "{}"}</tool_call><|im_end|>\n',
        ),
    ],
)
def test_chat_template_renders(tokenizer, messages, generation_prompt, expected):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == expected


def test_prompt_is_prefix_of_conversation(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full.startswith(prompt)


def test_generation_markers_mask_reply_and_end_of_turn(tokenizer):
    conversation = [
        *CONVERSATION,
        {"role": "user", "content": "and my refund?"},
        {"role": "assistant", "content": "refund"},
    ]
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [token for token, bit in zip(out["input_ids"], out["assistant_masks"], strict=True) if bit]
    text = tokenizer.decode(masked)
    assert text == "shipping_status<|im_end|>refund<|im_end|>"
    assert models.has_generation_markers(tokenizer.chat_template)


def test_load_tokenizer_needs_a_chat_template(tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="model.chat_template"):
        models.load_tokenizer(ModelSpec(name=str(bare)))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = models.load_tokenizer(ModelSpec(name=str(bare), chat_template=template))
    assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "user: where is my order?\n"
    assert not models.has_generation_markers(tokenizer.chat_template)


def test_load_model_on_chosen_device(tiny_dir):
    device, dtype = models.choose_device()
    model = models.load_model(tiny_dir)
    assert model.device.type == device and model.dtype == dtype
    assert not model.training
    if not torch.cuda.is_available():
        assert (device, dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        (CONVERSATION, 2),
        (CONVERSATION[:2], None),
        ([*CONVERSATION, {"role": "user", "content": "thanks"}], 2),
    ],
)
def test_last_assistant_index(messages, index):
    assert models.last_assistant_index(messages) == index


# What a model may run as it loads: its own code only with model.trust_remote_code, pickled
# weights only with model.allow_pickle_weights. Each refusal names the model, the problem and the fix.
CUSTOM_AUTO_MAP = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyLM"}


def with_config(tiny_dir, folder, **changes):
    """A copy of the tiny model whose config.json has `changes`."""
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


def test_a_model_with_its_own_code_needs_the_recipe_switch(tiny_dir, tmp_path):
    folder = with_config(tiny_dir, tmp_path / "custom", model_type="my_lm", auto_map=CUSTOM_AUTO_MAP)
    spec = ModelSpec(name=str(folder))
    for load in (models.load_config, lambda s: models.load_model(s.name)):
        with pytest.raises(models.ModelError) as caught:
            load(spec)
        message = str(caught.value)
        assert f"model.name: {str(folder)!r} needs its own Python code" in message
        assert "configuration_mine.MyConfig" in message and "`model.trust_remote_code: true`" in message
    with pytest.raises(models.ModelError, match="must hold its files and the code files its auto_map names"):
        models.load_config(spec.model_copy(update={"trust_remote_code": True}))  # no configuration_mine.py


def test_an_unknown_architecture_is_named(tiny_dir, tmp_path):
    folder = with_config(tiny_dir, tmp_path / "unknown", model_type="brand_new_arch")
    with pytest.raises(
        models.ModelError, match="has model_type 'brand_new_arch' in its config.json, which transformers"
    ):
        models.load_config(ModelSpec(name=str(folder)))


def pickled_copy(tiny_dir, folder):
    """The tiny model with its weights in pickle format only (pytorch_model.bin)."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickled_weights_load_only_when_the_recipe_allows_them(tiny_dir, tmp_path):
    folder = pickled_copy(tiny_dir, tmp_path / "pickled")
    with pytest.raises(models.ModelError) as caught:
        models.load_model(folder)
    message = str(caught.value)
    assert f"{folder} holds pytorch_model.bin and no .safetensors file" in message
    assert "`model.allow_pickle_weights: true`" in message
    allowed = models.load_model(folder, allow_pickle_weights=True)
    original = models.load_model(tiny_dir)
    assert all(torch.equal(allowed.state_dict()[k], v) for k, v in original.state_dict().items())


def test_a_pickled_adapter_is_refused_too(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    get_peft_model(models.load_model(tiny_dir), LoraConfig(r=2, task_type="CAUSAL_LM")).save_pretrained(
        adapter
    )
    assert models.load_trained(adapter).peft_config["default"].r == 2  # safetensors: loads
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(models.ModelError, match=f"{adapter} holds adapter_model.bin"):
        models.load_trained(adapter)
    assert models.load_trained(adapter, allow_pickle_weights=True).peft_config["default"].r == 2


def test_the_tiny_model_is_saved_as_safetensors(tiny_dir):
    assert (tiny_dir / "model.safetensors").is_file()
    assert not [p.name for p in tiny_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
