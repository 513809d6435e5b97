"""The recipe: one frozen, typed description of a whole fine-tuning project.

It is loaded from YAML with `key=value` overrides, validated once (every error listed with its
field path), passed to the `finetune` flow as its parameter (so the Prefect UI renders it as a
form), and saved beside every run. Defaults live here and nowhere else.

Relative paths in a recipe are relative to the project folder (the working directory).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from tuneline.errors import UserError

Format = Literal["alpaca", "sharegpt", "openai", "prompt_completion", "self_instruct"]


class Section(BaseModel):
    """Base of every recipe section: frozen, and unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Content digest of the section: what stage caching keys on."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class FileSource(Section):
    """Records in a file: a local path or any fsspec URL (file://, https://, s3://...)."""

    kind: Literal["file"] = "file"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    path: str = Field(description="Local path (relative to the project) or fsspec URL.")
    format: Format | None = Field(None, description="Record format; detected from the file when empty.")


class UrlSource(Section):
    """A dataset file downloaded once (http, https, s3, file), checked and kept in the store.

    Interrupted HTTP downloads resume from where they stopped; .gz and .zip are unpacked.
    """

    kind: Literal["url"] = "url"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    url: str = Field(pattern=r"^(https?|s3|file)://", description="http(s)://, s3:// or file:// URL.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of the downloaded file."
    )
    format: Format | None = Field(None, description="Record format; detected from the file when empty.")
    retries: int = Field(4, ge=0, le=20, description="Retries on 5xx, timeouts and dropped connections.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds without data before a try fails.")


class HfSource(Section):
    """A dataset read through `datasets.load_dataset`: a hub name or a local folder or file."""

    kind: Literal["hf"] = "hf"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    dataset: str = Field(description="Hub name (OWNER/NAME), local folder, or local data file.")
    config: str | None = Field(None, description="Dataset configuration (load_dataset's `name`).")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Dataset column -> record key (instruction, input, output, system, prompt, "
        "completion, messages, conversations), renamed before the format is detected.",
    )
    format: Format | None = Field(None, description="Record format of the renamed rows; detected when empty.")


class CrawlSource(Section):
    """A website crawled by the Tuneline Scrapy spider, in a subprocess of its own.

    `documents` keeps each page's title and main text (raw HTML stays in the fetch stage);
    `pairs` turns question/answer selectors on FAQ pages into conversations.
    """

    kind: Literal["crawl"] = "crawl"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    mode: Literal["documents", "pairs"] = "documents"
    start_urls: list[str] = Field(default_factory=list, description="Pages the crawl starts from.")
    sitemaps: list[str] = Field(default_factory=list, description="Sitemap URLs whose pages are crawled.")
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Hosts (and their subdomains) the crawl may visit; default: hosts of the start URLs.",
    )
    allow: list[str] = Field(default_factory=list, description="Follow only URLs matching one of these.")
    deny: list[str] = Field(default_factory=list, description="Never follow URLs matching these regexes.")
    max_depth: int = Field(3, ge=0, description="Links followed from a start page, at most.")
    max_pages: int = Field(1000, ge=1, description="Pages crawled, at most.")
    selectors: Literal["css", "xpath"] = Field("css", description="Language of the pair selectors.")
    pair: str | None = Field(None, description="pairs mode: selector of each question/answer block.")
    question: str | None = Field(None, description="pairs mode: question text, inside `pair` if given.")
    answer: str | None = Field(None, description="pairs mode: answer text, inside `pair` if given.")
    concurrency: int = Field(4, ge=1, le=64, description="Parallel requests per domain.")
    allow_private: bool = Field(
        False, description="Allow private, loopback and link-local addresses (local test sites only)."
    )

    @model_validator(mode="after")
    def _has_pages_and_selectors(self) -> CrawlSource:
        if not self.start_urls and not self.sitemaps:
            raise ValueError("give start_urls or sitemaps: the crawl has nowhere to start")
        if self.mode == "pairs" and not (self.question and self.answer):
            raise ValueError("mode pairs needs `question` and `answer` selectors")
        return self


def _source_kind(value: Any) -> str:
    """A source's `kind`; "file" when left out, so recipes written before kinds existed still load."""
    if isinstance(value, dict):
        return value.get("kind", "file")
    return getattr(value, "kind", "file")


Source = Annotated[
    Annotated[FileSource, Tag("file")]
    | Annotated[UrlSource, Tag("url")]
    | Annotated[HfSource, Tag("hf")]
    | Annotated[CrawlSource, Tag("crawl")],
    Discriminator(_source_kind),
]


class TeacherSpec(Section):
    """The teacher: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, a Tuneline-served model).

    Every exchange can be recorded by request digest, so re-runs cost nothing (`record`) and a run
    can be repeated offline, exactly (`replay`).
    """

    base_url: str = Field(
        pattern=r"^https?://",
        description="Endpoint root, usually ending in /v1 (e.g. http://localhost:8000/v1).",
    )
    model: str = Field(min_length=1, description="Model name the endpoint serves.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the API key; wins over api_key_env."
    )
    mode: Literal["live", "record", "replay"] = Field(
        "record",
        description="live: always ask; record: serve recorded exchanges, ask and record the rest; "
        "replay: recorded exchanges only (offline), a missing one is an error.",
    )
    recordings: str = Field(".tuneline/teacher", description="Folder of recorded exchanges (one JSON each).")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once, at most.")
    max_retries: int = Field(5, ge=0, le=20, description="Retries of a request on 429, 5xx and timeouts.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one try may take.")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=1, description="Longest reply, in tokens.")
    seed: int | None = Field(None, description="Sampling seed sent to the endpoint (where it honours one).")
    json_mode: bool = Field(True, description="Ask for a JSON object reply (response_format json_object).")


PiiKind = Literal["email", "phone", "ip", "card", "secret"]


class CleanSpec(Section):
    """Repairs, filters and dedup applied before the quality gate; every drop has a named reason."""

    normalize_text: bool = Field(True, description="Unicode NFC, unified newlines, trimmed turns.")
    fix_mojibake: bool = Field(True, description="Repair mojibake and bad escapes with ftfy.")
    strip_control: bool = Field(
        True, description="Remove control and zero-width characters; collapse runs of spaces."
    )
    html: Literal["strip", "drop", "keep"] = Field(
        "strip", description="HTML tags and entities: strip them, drop the record, or keep them."
    )
    check_structure: bool = Field(
        True, description="Roles alternate, the last turn is the assistant's, tool turns are well formed."
    )
    min_chars: int = Field(2, ge=0, description="Shortest conversation kept, in characters.")
    max_chars: int = Field(20_000, ge=1, description="Longest conversation kept, in characters.")
    min_tokens: int = Field(0, ge=0, description="Fewest base-model tokens kept (needs the model section).")
    max_tokens: int | None = Field(
        None, ge=1, description="Most base-model tokens kept; None skips tokenizing (cheaper)."
    )
    over_length: Literal["drop", "truncate"] = Field(
        "drop", description="Over max_chars/max_tokens: drop the record, or truncate its last turn."
    )
    languages: list[str] = Field(
        default_factory=list, description="Allowed ISO 639-1 languages (e.g. [en, de]); empty keeps all."
    )
    min_language_confidence: float = Field(
        0.5, ge=0, le=1, description="Lowest language-identification confidence kept."
    )
    redact_pii: list[PiiKind] = Field(
        default_factory=lambda: ["email", "phone", "ip", "card", "secret"],
        description="PII kinds replaced by a placeholder such as <EMAIL>; empty turns redaction off.",
    )
    dedup: bool = Field(True, description="Drop exact duplicates of normalized conversations.")
    near_dedup: bool = Field(True, description="Drop near duplicates found by MinHash LSH.")
    near_dedup_threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity of word n-grams that counts as near."
    )
    near_dedup_ngram: int = Field(5, ge=1, description="Words per shingle for near-dedup.")
    near_dedup_permutations: int = Field(64, ge=8, le=512, description="MinHash permutations.")
    batch_size: int = Field(10_000, ge=1, description="Records processed per batch (memory stays flat).")
    workers: int = Field(
        2, ge=1, le=64, description="Processes repairing and hashing batches in parallel (1: none)."
    )


class QualitySpec(Section):
    """The quality gate: a Great Expectations suite from expectations/ and its thresholds."""

    suite: str = Field("conversations", description="Suite file name in expectations/ (without .json).")
    min_records: int = Field(10, ge=1, description="Fewer records than this fail the gate.")
    min_chars: int = Field(2, ge=0, description="Shortest allowed user and assistant turn.")
    max_chars: int = Field(20_000, ge=1, description="Longest allowed user and assistant turn.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most base-model tokens per record (counted by clean when it tokenizes)."
    )
    max_duplicate_rate: float = Field(0.0, ge=0, le=1, description="Highest share of repeated record ids.")
    languages: list[str] = Field(
        default_factory=list, description="Languages the data should be in; empty skips the check."
    )
    min_language_share: float = Field(0.95, ge=0, le=1, description="Least share of records in `languages`.")
    max_label_share: float = Field(
        1.0, gt=0, le=1, description="Highest share of the most common final assistant answer (labels)."
    )
    mostly: float = Field(1.0, gt=0, le=1, description="Share of rows each row-level check must pass.")
    examples: int = Field(3, ge=0, le=50, description="Failing rows shown per failed expectation.")


class SplitSpec(Section):
    """Deterministic train/validation/test split, by hashing each record id with the seed."""

    validation: float = Field(0.1, ge=0, lt=1, description="Share of records for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Share of records held out for the test split.")
    seed: int = Field(0, description="Changing the seed re-deals the records.")
    decontaminate: bool = Field(
        True, description="Drop training records sharing a long n-gram with validation, test or benchmarks."
    )
    decontaminate_ngram: int = Field(13, ge=3, description="Words per n-gram for decontamination.")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Benchmark prompt files (dataset files, or .txt: one prompt a line) kept out.",
    )

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitSpec:
        if self.validation + self.test >= 1:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves nothing to train on; "
                "keep their sum below 1"
            )
        return self


class ModelSpec(Section):
    """The base model: a Hugging Face hub name or a local folder, loaded with from_pretrained."""

    name: str = Field(description="Hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    trust_remote_code: bool = False


class LoraSpec(Section):
    """LoRA adapter settings (peft.LoraConfig)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter, e.g. embed_tokens and lm_head.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r), not alpha/r.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): better at low rank, slower steps.")


class FreezeSpec(Section):
    """Freeze tuning: only the top decoder layers and the named modules train, in full."""

    trainable_layers: int = Field(2, ge=0, description="Top N decoder layers that train.")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Regexes of parameter names that train as well, e.g. lm_head or model.norm.",
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Each lower layer trains at the learning rate times this, once more."
    )
    unfreeze_every: int | None = Field(
        None, ge=1, description="Gradual unfreezing: one more (lower) layer trains every N epochs or steps."
    )
    unfreeze_unit: Literal["epoch", "step"] = Field("epoch", description="What unfreeze_every counts.")

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeSpec:
        if self.trainable_layers == 0 and not self.trainable_modules:
            raise ValueError("nothing would train; set trainable_layers above 0 or list trainable_modules")
        if self.unfreeze_every is not None and self.trainable_layers < 2:
            raise ValueError("unfreeze_every needs trainable_layers of 2 or more: one layer cannot unfreeze")
        for pattern in self.trainable_modules:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"trainable_modules: {pattern!r} is not a regex ({error})") from None
        return self


class QuantizationSpec(Section):
    """QLoRA's quantized base: 4-bit weights through bitsandbytes, the LoRA adapter in full precision."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normal weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = Field("bf16", description="Dtype of the matmuls.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        "paged_adamw_8bit", description="Paged optimizers move their state to CPU memory under pressure."
    )


class PromptLearningSpec(Section):
    """Soft prompts through peft: p-tuning (prompt encoder), prefix tuning, prompt tuning."""

    num_virtual_tokens: int = Field(20, ge=1, description="Trained virtual tokens before each input.")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="p-tuning: hidden size of the prompt encoder (default: the model's)."
    )
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="p-tuning: the prompt encoder.")
    prefix_projection: bool = Field(False, description="prefix: train the prefix through an MLP.")
    init_text: str | None = Field(
        None, description="prompt: start the virtual tokens from this text's embeddings, not at random."
    )

    def misplaced(self, method: str) -> list[str]:
        """Settings given that the method does not read, as 'key (for method)' strings."""
        owners = {
            "encoder_hidden_size": ("p-tuning", self.encoder_hidden_size is not None),
            "encoder_type": ("p-tuning", self.encoder_type != "MLP"),
            "prefix_projection": ("prefix", self.prefix_projection),
            "init_text": ("prompt", self.init_text is not None),
        }
        return [f"{key} (for {owner})" for key, (owner, given) in owners.items() if given and owner != method]


# The recipe section each training method reads; any other method section given is an error.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "full": (),
    "freeze": ("freeze",),
    "lora": ("lora",),
    "qlora": ("lora", "quantization"),
    "p-tuning": ("prompt_learning",),
    "prefix": ("prompt_learning",),
    "prompt": ("prompt_learning",),
}


class FsdpSpec(Section):
    """FSDP settings of a distributed run, written into its accelerate config file."""

    version: Literal[1, 2] = Field(2, description="FSDP implementation (2: per-parameter sharding).")
    sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        "FULL_SHARD", description="What is sharded: parameters, gradients and optimizer state, or less."
    )
    offload_params: bool = Field(False, description="Keep parameters in CPU memory between uses.")
    wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    activation_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")


class DeepSpeedSpec(Section):
    """DeepSpeed ZeRO settings of a distributed run, written into its accelerate config file."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO 1: optimizer, 2: +gradients, 3: +weights.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"


class DistributedSpec(Section):
    """Training over several processes, GPUs or machines, launched with `accelerate launch`."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="none: one process in the flow's own; ddp, fsdp or deepspeed: launched workers."
    )
    processes_per_node: int = Field(1, ge=1, description="Processes per machine, usually one per GPU.")
    nodes: int = Field(1, ge=1, description="Machines; start the flow on each with its node_rank.")
    node_rank: int = Field(0, ge=0, description="This machine's rank, 0 on the main one.")
    main_address: str = Field("127.0.0.1", description="Address of the node_rank 0 machine.")
    main_port: int = Field(29500, ge=0, le=65535, description="Rendezvous port; 0: a free one (one node).")
    fsdp: FsdpSpec = FsdpSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()

    @property
    def world_size(self) -> int:
        """Processes in the whole run."""
        return self.processes_per_node * self.nodes

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.world_size > 1 and self.strategy == "none":
            raise ValueError(
                f"{self.world_size} processes with strategy none; set strategy to ddp, fsdp or deepspeed"
            )
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nodes {self.nodes}")
        if self.main_port == 0 and self.nodes > 1:
            raise ValueError("main_port 0 (a free port) works on one node only; give the port all nodes use")
        return self


class TrainSpec(Section):
    """Supervised fine-tuning with TRL's SFT trainer; loss on assistant tokens only."""

    method: Literal["full", "freeze", "lora", "qlora", "p-tuning", "prefix", "prompt"] = Field(
        "lora", description="What trains: every weight, the top layers, a LoRA adapter or a soft prompt."
    )
    lora: LoraSpec | None = Field(None, description="lora and qlora (filled with defaults for them).")
    freeze: FreezeSpec | None = Field(None, description="freeze (filled with defaults for it).")
    quantization: QuantizationSpec | None = Field(None, description="qlora (filled with defaults for it).")
    prompt_learning: PromptLearningSpec | None = Field(
        None, description="p-tuning, prefix and prompt (filled with defaults for them)."
    )
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many steps; -1 trains for `epochs`.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="Longest tokenized example; longer ones are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, description="Seed of weights' initialisation, dropout and data order.")
    logging_steps: int = Field(5, ge=1)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="Learning-rate schedule after the warmup.")
    packing: bool = Field(
        False, description="Pack examples into rows without padding; examples never attend to each other."
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate on the validation split every N steps (loss, exact match)."
    )
    eval_metric: Literal["loss", "exact_match"] = Field(
        "loss", description="Validation metric that picks the best checkpoint, kept as the result."
    )
    eval_max_examples: int = Field(
        32, ge=1, description="Validation records answered by greedy generation for exact match."
    )
    eval_max_new_tokens: int = Field(32, ge=1, description="Longest generated answer for exact match.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; a killed run resumes from it.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is kept as well).")
    resume: Literal["auto", "fresh"] = Field(
        "auto", description="auto: go on from the last complete checkpoint; fresh: delete it, start over."
    )
    distributed: DistributedSpec = DistributedSpec()

    @model_validator(mode="before")
    @classmethod
    def _fill_method_sections(cls, data: Any) -> Any:
        """The chosen method's sections get their defaults, so `train.lora.r` reads without a check."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "lora")
        sections = METHOD_SECTIONS.get(method, ()) if isinstance(method, str) else ()
        return {**data, **{name: {} for name in sections if data.get(name) is None}}

    @model_validator(mode="after")
    def _sections_match_method(self) -> TrainSpec:
        used = METHOD_SECTIONS[self.method]
        for name, readers in (
            ("lora", "lora or qlora"),
            ("freeze", "freeze"),
            ("quantization", "qlora"),
            ("prompt_learning", "p-tuning, prefix or prompt"),
        ):
            if getattr(self, name) is not None and name not in used:
                raise ValueError(
                    f"train.{name} is set but train.method is {self.method}; remove train.{name} "
                    f"or set train.method to {readers}"
                )
        if self.freeze and self.freeze.unfreeze_every and self.distributed.strategy != "none":
            # DDP and FSDP fix the set of parameters they synchronise when they wrap the model.
            raise ValueError(
                "train.freeze.unfreeze_every: gradual unfreezing runs in one process only; remove it "
                "or set train.distributed.strategy to none"
            )
        misplaced = self.prompt_learning.misplaced(self.method) if self.prompt_learning else []
        if misplaced:
            raise ValueError(
                f"train.prompt_learning: {', '.join(misplaced)} do(es) nothing with train.method "
                f"{self.method}; remove it or change the method"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_fits_checkpoints(self) -> TrainSpec:
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("early_stopping_patience needs eval_steps: without evaluations nothing improves")
        if self.eval_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps {self.save_steps} is not a multiple of eval_steps {self.eval_steps}; the best "
                "checkpoint can only be kept when every checkpoint follows an evaluation"
            )
        return self


class EvaluateSpec(Section):
    """Base vs tuned model on the test split: loss and a task metric on greedy generations."""

    metric: Literal["exact_match"] = "exact_match"
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test records.")


class AutoRejectRule(Section):
    """Auto policy rule: reject a candidate whose text matches `pattern`, giving `reason`."""

    pattern: str = Field(description="Regular expression searched in the candidate's messages.")
    reason: str = Field(min_length=1, description="Reject reason recorded (and fed back to the teacher).")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> AutoRejectRule:
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {error}") from None
        return self


class AutoPolicy(Section):
    """Decisions for unattended runs, recorded with `reviewer: auto-policy`.

    Every candidate reaching review has passed the automatic checks; the first matching rule
    rejects it, the rest get `default`.
    """

    default: Literal["accept", "reject"] = Field(
        description="Decision for a candidate no rule rejects (accept: trust the automatic checks)."
    )
    reject_if: list[AutoRejectRule] = Field(default_factory=list, description="Rules tried in order.")


class ReviewSpec(Section):
    """The human review checkpoint after each augmentation round.

    `prefect`, `terminal` and `file` all pause the run until every candidate has a decision
    (accept, reject with a reason, or edit); they differ only in where the reviewer is told to
    look. `auto` decides with the explicit `auto` policy and never pauses.
    """

    how: Literal["prefect", "terminal", "file", "auto"] = Field(
        "prefect",
        description="prefect: form in the paused run; terminal: `tuneline review`; "
        "file: `tuneline review export/import`; auto: the `auto` policy, no person.",
    )
    timeout_s: int = Field(
        24 * 3600, ge=1, description="Seconds a round waits for decisions before the run fails (kept)."
    )
    reviewer: str = Field("reviewer", min_length=1, description="Name recorded for decisions from the UI.")
    auto: AutoPolicy | None = Field(None, description="The policy used when `how` is auto.")

    @model_validator(mode="after")
    def _auto_needs_policy(self) -> ReviewSpec:
        if self.how == "auto" and self.auto is None:
            raise ValueError(
                "how: auto needs an explicit policy: set auto.default (accept or reject) "
                "and optionally auto.reject_if rules"
            )
        return self


class SeedsSpec(Section):
    """Seed examples shown to the teacher: a file of any supported format."""

    path: str = Field(description="Local path (relative to the project) or fsspec URL of the seed file.")
    format: Format | None = Field(None, description="Record format; detected from the file when empty.")


class AugmentChecks(Section):
    """Automatic checks every generated candidate passes before a person sees it."""

    min_chars: int = Field(10, ge=0, description="Shortest candidate (its user and assistant turns), chars.")
    max_chars: int = Field(4000, ge=1, description="Longest candidate (its user and assistant turns), chars.")
    similarity: float = Field(
        0.7,
        gt=0,
        le=1,
        description="ROUGE-L F1 between user turns at or above which a candidate is a near duplicate "
        "of a seed or of the pool (accepted records and this round's earlier candidates).",
    )
    blocklist: list[str] = Field(
        default_factory=list,
        description="Case-insensitive words or phrases (matched as whole words) or regular expressions; "
        "a candidate containing one is rejected.",
    )

    @model_validator(mode="after")
    def _blocklist_compiles(self) -> AugmentChecks:
        for entry in self.blocklist:
            try:
                re.compile(entry)
            except re.error as error:
                raise ValueError(
                    f"blocklist entry {entry!r} is not a valid regular expression: {error}; "
                    "escape special characters with a backslash"
                ) from None
        return self


SEED_PROMPT = """Here are examples of the task:

{examples}

Write {n} new examples of the same task. Vary the wording, the situations and the length, keep the \
style of the answers, and do not copy or closely paraphrase the examples.

Common mistakes to avoid:
{mistakes}"""

DOCUMENT_PROMPT = """Here is an extract of a document:

<document>
{document}
</document>

Write {n} question-and-answer pairs a reader of this document might ask. Each answer must be correct \
according to the extract alone, complete on its own, and must not mention "the extract" or "the \
document". Ask about different facts.

Common mistakes to avoid:
{mistakes}"""

PROMPT_PLACEHOLDERS = {"examples", "document", "n", "mistakes", "round"}


class AugmentSpec(Section):
    """Teacher-generated examples in reviewed rounds, before cleaning.

    Each round asks the teacher for `per_round` candidates (in requests of `per_request`), checks
    them automatically, has them reviewed, and feeds the reject reasons and edits of all rounds so
    far back into the next prompt as common mistakes. It stops at `target_accepted`, at
    `max_rounds`, or when a round's acceptance falls below `min_acceptance_rate`.
    """

    mode: Literal["seeds", "documents"] = Field(
        "seeds",
        description="seeds: new examples like the seeds; documents: question/answer pairs grounded in "
        "the collected documents (crawl sources in documents mode), each keeping its URL.",
    )
    teacher: TeacherSpec
    review: ReviewSpec = ReviewSpec()
    seeds: SeedsSpec | None = Field(
        None, description="seeds mode: seed file; when empty, the collected records are the seeds."
    )
    system: str | None = Field(
        None,
        description="System prompt of the generated records; empty: the seeds' own if they all share one.",
    )
    prompt: str | None = Field(
        None,
        description="User prompt template with {examples} (seeds mode) or {document} (documents mode), "
        "{mistakes}, and optionally {n} and {round}; literal braces are doubled. Empty: a default per mode.",
    )
    examples_per_request: int = Field(5, ge=1, le=50, description="seeds mode: seeds shown in each request.")
    chunk_chars: int = Field(2000, ge=200, description="documents mode: largest document chunk, characters.")
    per_round: int = Field(20, ge=1, le=1000, description="Candidates asked for in one round.")
    per_request: int = Field(5, ge=1, le=100, description="Candidates asked for in one teacher request.")
    max_rounds: int = Field(5, ge=1, description="Rounds at most.")
    target_accepted: int = Field(100, ge=1, description="Stop once this many candidates were accepted.")
    min_acceptance_rate: float = Field(
        0.0, ge=0, le=1, description="Stop when a round accepts a smaller share of its candidates."
    )
    checks: AugmentChecks = AugmentChecks()

    def prompt_template(self) -> str:
        """The user prompt template in force: the recipe's, or the default for the mode."""
        if self.prompt is not None:
            return self.prompt
        return SEED_PROMPT if self.mode == "seeds" else DOCUMENT_PROMPT

    @model_validator(mode="after")
    def _prompt_fits_mode(self) -> AugmentSpec:
        try:
            parsed = string.Formatter().parse(self.prompt_template())
            fields = {name for _, name, _, _ in parsed if name is not None}
        except ValueError as error:
            raise ValueError(f"prompt: {error}; write literal braces as {{{{ and }}}}") from None
        unknown = sorted(fields - PROMPT_PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"prompt: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; use "
                f"{', '.join('{' + n + '}' for n in sorted(PROMPT_PLACEHOLDERS))}, and double literal braces"
            )
        needed = {"mistakes", "examples" if self.mode == "seeds" else "document"}
        if missing := sorted(needed - fields):
            raise ValueError(
                f"prompt: mode {self.mode} needs the placeholder(s) "
                f"{', '.join('{' + n + '}' for n in missing)} ({{mistakes}} carries earlier rounds' feedback)"
            )
        if self.mode == "documents" and self.seeds is not None:
            raise ValueError("seeds: only used in mode seeds; remove it or set mode: seeds")
        if self.per_request > self.per_round:
            raise ValueError(f"per_request {self.per_request} is larger than per_round {self.per_round}")
        return self


class RegisterSpec(Section):
    """MLflow registration and the promotion rule for the `champion` alias."""

    model_name: str = Field(description="Registered model name in MLflow.")
    tracking_uri: str = Field("sqlite:///.tuneline/mlflow.db", description="MLflow tracking URI.")
    experiment: str = "tuneline"
    promote_metric: Literal["exact_match", "loss"] = "exact_match"
    margin: float = Field(0.0, ge=0, description="How much the candidate must beat the champion by.")


# `register` is the stage's name everywhere. As a field it shadows ABCMeta.register, which
# pydantic would take as its default: the explicit `Field(...)` below keeps it required.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Recipe(Section):
    """A whole fine-tuning project, from sources to a registered model."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Project name.")
    artifacts_dir: str = Field(".tuneline", description="Where stage artifacts are stored.")
    sources: list[Source] = Field(min_length=1)
    augment: AugmentSpec | None = Field(
        None, description="Teacher-generated examples in reviewed rounds, added before cleaning."
    )
    clean: CleanSpec = CleanSpec()
    quality: QualitySpec = QualitySpec()
    split: SplitSpec = SplitSpec()
    model: ModelSpec
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    register: RegisterSpec = Field(...)

    @model_validator(mode="after")
    def _unique_source_names(self) -> Recipe:
        names = [source.name for source in self.sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _augment_has_documents(self) -> Recipe:
        grounded = self.augment is not None and self.augment.mode == "documents"
        if grounded and not any(s.kind == "crawl" and s.mode == "documents" for s in self.sources):
            raise ValueError(
                "augment.mode documents needs collected documents: add a crawl source with mode: documents"
            )
        return self


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; `problems` holds one 'field.path: message' line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b.c=value` overrides, and validate it once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(str(path), [f"cannot read the recipe: {error.strerror}"]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(where, [f"not valid YAML: {getattr(error, 'problem', error)}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"expected a mapping of sections, got {type(data).__name__}"])
    problems: list[str] = []
    for override in overrides:
        problem = apply_override(data, override)
        if problem:
            problems.append(problem)
    if problems:
        raise RecipeError(str(path), problems)
    return validate_recipe(data, str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping, listing every error with its field path and the bad value."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(source, [describe_error(e) for e in error.errors()]) from None


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as 'field.path: message (got value)'."""
    where = ".".join(str(part) for part in error["loc"]) or "(recipe)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; check its spelling against `tuneline recipe schema`"
    if error["type"] == "missing":
        return f"{where}: required, but missing"
    value = error.get("input")
    shown = json.dumps(value, default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{where}: {message} (got {shown})"


def apply_override(data: dict[str, Any], override: str) -> str | None:
    """Set `a.b.0.c=value` in the mapping (value parsed as YAML); returns a problem or None."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        return f"override {override!r}: expected key=value, e.g. train.learning_rate=1e-4"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"override {key}: {'.'.join(parts[: depth + 1])} is not an item of the list"
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            return f"override {key}: {'.'.join(parts[: depth + 1])} holds a value, not a section"
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return f"override {key}: {last} is not an item of the list"
        node[int(last)] = value
    else:
        node[last] = value
    return None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default written out: what a run actually used."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten_recipe(recipe: Recipe) -> dict[str, str]:
    """Recipe as flat `section.key` -> value strings, the shape MLflow params want."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat
