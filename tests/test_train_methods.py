"""Every training method on a tiny local model: a few steps, what trained, the export, the plan.

Each method is prepared with `methods.prepare_model`, trained three steps by TRL's SFT trainer
with the optimizer and callbacks the method asks for, exported with `export.export_model`, and
reloaded with plain transformers/peft, as someone without Tuneline would.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from peft import PeftModel
from train_fixtures import conversation
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline import models
from tuneline.evaluate.stage import assistant_loss, generate_replies
from tuneline.recipe import FreezeSpec, ModelSpec, PromptLearningSpec, TrainSpec, validate_recipe
from tuneline.train import export, methods
from tuneline.train.plan import format_plan, plan_training

LABELS = {
    "refund": ["I want my money back", "refund the lamp please", "can I get a refund"],
    "shipping": ["where is my order", "my parcel has not arrived", "track order 12"],
}
CPU = not torch.cuda.is_available()
METHODS = ["full", "freeze", "lora", "qlora", "p-tuning", "prefix", "prompt"]
SECTIONS = {
    "lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "qlora": {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # bitsandbytes cannot page on CPU (refused there); the GPU test below runs the default.
        "quantization": {"compute_dtype": "fp32", "optimizer": "adamw_8bit" if CPU else "paged_adamw_8bit"},
    },
    "freeze": {"freeze": {"trainable_layers": 1, "trainable_modules": ["lm_head"]}},
    "p-tuning": {"prompt_learning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}},
    "prefix": {"prompt_learning": {"num_virtual_tokens": 4}},
    "prompt": {"prompt_learning": {"num_virtual_tokens": 4, "init_text": "Label the message."}},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    conversations = [conversation(q, label) for label, qs in LABELS.items() for q in qs]
    corpus = [m["content"] for c in conversations for m in c]
    base_dir = models.make_tiny_model(
        root / "base", corpus, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2
    )
    return {"root": root, "base_dir": base_dir, "conversations": conversations}


def train_spec(method: str, **extra) -> TrainSpec:
    return TrainSpec(
        method=method,
        max_steps=3,
        learning_rate=1e-2,
        batch_size=3,
        max_length=64,
        **{**SECTIONS.get(method, {}), **extra},
    )


def sft_config(output_dir):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=3,
        max_length=64,
        logging_steps=1,
        assistant_only_loss=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def train_few_steps(tiny, train: TrainSpec):
    """Prepare, train three steps and return (prepared, trainer, parameters before training)."""
    from datasets import Dataset
    from trl import SFTTrainer

    model_spec = ModelSpec(name=str(tiny["base_dir"]))
    tokenizer = models.load_tokenizer(model_spec)
    prepared = methods.prepare_model(model_spec, train)
    before = {name: p.detach().float().clone() for name, p in prepared.model.named_parameters()}
    args = sft_config(tiny["root"] / f"run-{train.method}")
    trainer = SFTTrainer(
        model=prepared.model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": c} for c in tiny["conversations"]]),
        processing_class=tokenizer,
        optimizers=(methods.build_optimizer(prepared.model, train, args, prepared), None),
        callbacks=methods.method_callbacks(train, prepared),
    )
    trainer.train()
    return prepared, trainer, tokenizer, before


def logits_of(model, tokenizer, conversations):
    batch = tokenizer(
        [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations],
        return_tensors="pt",
        padding=True,
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_exports_and_reloads(tiny, method):
    train = train_spec(method)
    prepared, trainer, tokenizer, before = train_few_steps(tiny, train)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)

    model = prepared.model
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained, "the method trains nothing"
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach().float())
        assert changed == (name in trained), f"{name}: changed={changed}, trainable={name in trained}"
    trainable, _ = methods.count_parameters(prepared)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan_training(ModelSpec(name=str(tiny["base_dir"])), train).trainable_params == trainable

    expected = logits_of(model, tokenizer, tiny["conversations"][:2])
    stage_dir = tiny["root"] / f"stage-{method}"
    written = export.export_model(model, tokenizer, stage_dir, ModelSpec(name=str(tiny["base_dir"])), train)
    assert ("adapter" in written) == (method in methods.PEFT_METHODS)
    assert ("model" in written) == (method not in methods.PROMPT_METHODS)
    if "adapter" in written:  # plain peft, on the base the adapter was trained on
        if method == "qlora":
            base = AutoModelForCausalLM.from_pretrained(
                tiny["base_dir"], quantization_config=methods.build_quantization_config(train)
            )
            methods.keep_narrow_layers_off_packed_cpu_kernel(base)  # hidden size 32 < bnb's block
        else:
            base = AutoModelForCausalLM.from_pretrained(tiny["base_dir"])
        reloaded = PeftModel.from_pretrained(base, stage_dir / "adapter")
        # TRL trains qlora adapters in bf16; peft reloads them in fp32: bf16 rounding apart.
        tolerance = 5e-3 if method == "qlora" else 1e-4
        assert torch.allclose(
            logits_of(reloaded, tokenizer, tiny["conversations"][:2]), expected, atol=tolerance
        )
    if "model" in written:  # plain transformers
        merged = AutoModelForCausalLM.from_pretrained(stage_dir / "model")
        merged_tokenizer = AutoTokenizer.from_pretrained(stage_dir / "model")
        got = logits_of(merged, merged_tokenizer, tiny["conversations"][:2])
        if method == "qlora":  # merged into the full-precision base: same as that base + adapter
            full = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny["base_dir"]), stage_dir / "adapter"
            )
            expected = logits_of(full, tokenizer, tiny["conversations"][:2])
        assert torch.allclose(got, expected, atol=1e-4)
        assert (stage_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_soft_prompt_result_evaluates_and_serves_from_its_adapter(tiny):
    """A prompt-learning result has no merged model: evaluation and the registered model's pyfunc
    load base + adapter, and score it as the trained model scored (virtual tokens' logits cut off)."""
    from types import SimpleNamespace

    from tuneline.register.chat_model import TunelineChatModel

    train = train_spec("prompt")
    prepared, _, tokenizer, _ = train_few_steps(tiny, train)
    trained_loss = assistant_loss(prepared.model.eval(), tokenizer, tiny["conversations"], batch_size=4)
    stage_dir = tiny["root"] / "stage-eval-prompt"
    export.export_model(prepared.model, tokenizer, stage_dir, ModelSpec(name=str(tiny["base_dir"])), train)
    folder = models.trained_folder(stage_dir)
    assert folder.name == "adapter"
    model = models.load_trained(folder)
    loaded_tokenizer = models.load_tokenizer(ModelSpec(name=str(folder)))
    loss = assistant_loss(model, loaded_tokenizer, tiny["conversations"], batch_size=4)
    assert math.isfinite(loss) and loss == pytest.approx(trained_loss, rel=1e-5)
    replies = generate_replies(
        model, loaded_tokenizer, tiny["conversations"][:2], max_new_tokens=3, batch_size=2
    )
    context = SimpleNamespace(
        artifacts={"model": str(folder)}, model_config={"max_new_tokens": 3, "batch_size": 2}
    )
    served = TunelineChatModel()
    served.load_context(context)
    assert served.predict(context, tiny["conversations"][:2]) == replies


@pytest.mark.slow
def test_freeze_layer_decay_and_gradual_unfreezing(tiny):
    """The lower layer waits for its turn (unfreeze_every 5 steps, 3 steps run) and has a decayed lr."""
    train = train_spec(
        "freeze",
        freeze=FreezeSpec(trainable_layers=2, layer_lr_decay=0.5, unfreeze_every=5, unfreeze_unit="step"),
    ).model_copy()
    prepared, trainer, _, before = train_few_steps(tiny, train)
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * 0.5)
    params = dict(prepared.model.named_parameters())
    top = "model.layers.1.mlp.down_proj.weight"
    lower = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[top], params[top].detach())
    assert torch.equal(before[lower], params[lower].detach())
    assert torch.equal(before["lm_head.weight"], params["lm_head.weight"].detach())
    callback = methods.method_callbacks(train, prepared)[0]
    assert [
        callback.unfrozen(type("S", (), {"global_step": step, "epoch": 0})) for step in (0, 4, 5, 50)
    ] == [
        1,
        1,
        2,
        2,
    ]


def test_freeze_errors_name_the_field(tiny):
    spec = ModelSpec(name=str(tiny["base_dir"]))
    with pytest.raises(methods.MethodError, match=r"train.freeze.trainable_layers: 5, but the model has 2"):
        methods.prepare_model(spec, TrainSpec(method="freeze", freeze={"trainable_layers": 5}))
    with pytest.raises(methods.MethodError, match=r"trainable_modules: 'lm_hed' matches no parameter"):
        methods.prepare_model(spec, TrainSpec(method="freeze", freeze={"trainable_modules": ["lm_hed"]}))


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"method": "full", "lora": {"r": 4}}, "train.lora is set but train.method is full"),
        ({"method": "lora", "freeze": {}}, "remove train.freeze or set train.method to freeze"),
        (
            {"method": "qlora", "prompt_learning": {}},
            "train.prompt_learning is set but train.method is qlora",
        ),
        ({"method": "prefix", "prompt_learning": {"init_text": "hi"}}, "init_text (for prompt)"),
        ({"method": "freeze", "freeze": {"trainable_layers": 0}}, "nothing would train"),
        ({"method": "freeze", "freeze": {"trainable_modules": ["lm_head("]}}, "'lm_head(' is not a regex"),
        ({"method": "adapters"}, "train.method: Input should be"),
        (
            {"method": "freeze", "freeze": {"unfreeze_every": 1}, "distributed": {"strategy": "ddp"}},
            "gradual unfreezing runs in one process only",
        ),
    ],
)
def test_recipe_rejects_sections_of_another_method(train, message):
    from tuneline.recipe import RecipeError

    data = {"name": "x", "sources": [{"name": "a", "path": "a.jsonl"}], "model": {"name": "m"}}
    with pytest.raises(RecipeError) as error:
        validate_recipe({**data, "train": train, "register": {"model_name": "x"}})
    assert message in str(error.value)


@pytest.mark.parametrize("method", METHODS)
def test_method_sections_filled_and_round_trip(method):
    """The chosen method's sections get defaults; a dumped train section loads back unchanged."""
    train = TrainSpec(method=method)
    expected = {"lora": ("lora", "qlora"), "quantization": ("qlora",), "freeze": ("freeze",)}
    for section, owners in expected.items():
        assert (getattr(train, section) is not None) == (method in owners)
    assert (train.prompt_learning is not None) == (method in methods.PROMPT_METHODS)
    assert TrainSpec.model_validate(train.model_dump(mode="json")) == train
    assert methods.describe_method(train)["name"] == method


def test_peft_configs_follow_the_recipe():
    lora = methods.build_peft_config(TrainSpec(lora={"r": 8, "alpha": 16, "rslora": True, "dora": True}))
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.use_dora) == (8, 16, True, True)
    assert lora.target_modules == "all-linear" and lora.modules_to_save is None
    encoder = methods.build_peft_config(
        TrainSpec(method="p-tuning", prompt_learning={"encoder_type": "LSTM"})
    )
    assert (type(encoder).__name__, encoder.encoder_reparameterization_type) == (
        "PromptEncoderConfig",
        "LSTM",
    )
    prompt = methods.build_peft_config(
        TrainSpec(method="prompt", prompt_learning=PromptLearningSpec(init_text="Label:")),
        tokenizer_name="tok",
    )
    assert (str(prompt.prompt_tuning_init), prompt.tokenizer_name_or_path) == ("TEXT", "tok")
    assert methods.build_peft_config(TrainSpec(method="full")) is None
    quantization = methods.build_quantization_config(TrainSpec(method="qlora"))
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
    assert methods.build_quantization_config(TrainSpec()) is None


def test_qlora_refused_before_weights_load_when_the_platform_cannot(tiny, monkeypatch):
    """No bitsandbytes, or an optimizer it cannot run here: a clear error, and no weight is read."""
    spec = ModelSpec(name=str(tiny["base_dir"]))

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the platform check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)
    real_find_spec = methods.importlib.util.find_spec
    monkeypatch.setattr(
        methods.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name),
    )
    with pytest.raises(
        methods.MethodError, match="qlora needs the bitsandbytes package.*train.method to lora"
    ):
        methods.prepare_model(spec, TrainSpec(method="qlora"))
    monkeypatch.setattr(methods.importlib.util, "find_spec", real_find_spec)

    if CPU:  # bitsandbytes cannot page on CPU: the default paged optimizer is refused there
        with pytest.raises(methods.MethodError, match="paged_adamw_8bit cannot page on cpu.*to adamw_8bit"):
            methods.prepare_model(spec, TrainSpec(method="qlora"))

    def broken(bnb, name):
        raise RuntimeError("paged memory needs CUDA")

    monkeypatch.setattr(methods, "_bnb_optimizer_class", broken)
    with pytest.raises(
        methods.MethodError, match="adamw_8bit does not run on .*set train.quantization.optimizer"
    ):
        methods.prepare_model(spec, TrainSpec(method="qlora", quantization={"optimizer": "adamw_8bit"}))


@pytest.mark.gpu
@pytest.mark.skipif(CPU, reason="needs a CUDA GPU")
def test_qlora_default_on_gpu_is_4bit_with_a_paged_optimizer(tiny):
    """The default qlora setting (NF4, double quantization, bf16 compute, paged 8-bit AdamW) on CUDA."""
    import bitsandbytes as bnb

    train = train_spec("qlora", quantization={})
    assert train.quantization.optimizer == "paged_adamw_8bit"
    prepared, trainer, _, _ = train_few_steps(tiny, train)
    assert isinstance(trainer.optimizer.optimizer, bnb.optim.PagedAdamW8bit)
    linear = prepared.model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.quant_type == "nf4"
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_plan_needs_no_weights_file(tiny, tmp_path):
    """The plan reads config.json only, and prices qlora below lora below full fine-tuning."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny["base_dir"] / "config.json", folder)
    spec = ModelSpec(name=str(folder))
    plans = {
        m: plan_training(spec, TrainSpec(method=m, max_length=64), device="cuda")
        for m in ("full", "lora", "qlora")
    }
    assert plans["full"].trainable_params == plans["full"].total_params
    assert plans["lora"].trainable_params == plans["qlora"].trainable_params < plans["full"].trainable_params
    assert plans["full"].memory["optimizer"] == 8 * plans["full"].total_params
    assert plans["qlora"].memory["weights"] < plans["lora"].memory["weights"]
    text = format_plan(plans["qlora"])
    assert plans["qlora"].checkpointed_peak_bytes < plans["qlora"].peak_bytes
    assert "qlora on cuda" in text and f"{plans['qlora'].trainable_params:,} trainable" in text


def test_train_plan_cli(tiny, tmp_path):
    from typer.testing import CliRunner

    from tuneline.cli.main import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: x\nsources: [{name: a, path: a.jsonl}]\n"
        f"model: {{name: '{tiny['base_dir']}'}}\nregister: {{model_name: x}}\n"
    )
    result = CliRunner().invoke(app, ["train", "plan", str(recipe), "train.method=freeze", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "method     freeze on cpu" in result.output and "peak" in result.output
    result = CliRunner().invoke(app, ["train", "plan", str(recipe), "train.method=freeze", "train.lora.r=4"])
    assert result.exit_code == 2 and "train.lora is set but train.method is freeze" in result.output


def test_a_run_edited_in_the_prefect_ui_can_switch_method():
    """Prefect keeps a run's parameters as dumped, and the UI edits that JSON: a method section
    the user never set must not be in it, one with settings of its own must still be caught."""
    from pydantic import ValidationError

    dumped = TrainSpec().model_dump(mode="json")
    assert "lora" not in dumped
    assert TrainSpec.model_validate({**dumped, "method": "full"}).lora is None
    tuned = TrainSpec(lora={"r": 8}).model_dump(mode="json")
    with pytest.raises(ValidationError, match="train.lora is set but train.method is full"):
        TrainSpec.model_validate({**tuned, "method": "full"})
    for method in METHODS:
        spec = TrainSpec(method=method)
        assert TrainSpec.model_validate(spec.model_dump(mode="json")) == spec
