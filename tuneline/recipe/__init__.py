"""The recipe: one frozen, typed description of a whole fine-tuning project.

It is loaded from YAML with `key=value` overrides, validated once (every error listed with its
field path), passed to the `finetune` flow as its parameter (so the Prefect UI renders it as a
form), and saved beside every run. Defaults live here and nowhere else: in this module and the
two that hold its largest sections, recipe_train.py and recipe_augment.py (re-exported here).

Relative paths in a recipe are relative to the project folder (the working directory).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tuneline.errors import UserError
from tuneline.objectstore import check_url, is_url, local_artifacts_dir
from tuneline.recipe.augment import (  # noqa: F401 - re-exported: `from tuneline.recipe import ...`
    DOCUMENT_PROMPT,
    PROMPT_PLACEHOLDERS,
    SEED_PROMPT,
    AugmentChecks,
    AugmentSpec,
    AutoPolicy,
    AutoRejectRule,
    ReviewSpec,
    SeedsSpec,
    TeacherSpec,
)
from tuneline.recipe.evaluate import (  # noqa: F401 - re-exported
    DEFAULT_RUBRIC,
    BenchmarkSpec,
    EvalMetric,
    EvaluateSpec,
    HumanSpec,
    JudgeEndpoint,
    JudgeSpec,
    PromoteMetric,
    promote_metric_problem,
)
from tuneline.recipe.pretrain import PretrainSpec  # noqa: F401 - re-exported
from tuneline.recipe.refresh import RefreshSchedule, RefreshSpec  # noqa: F401 - re-exported
from tuneline.recipe.section import Format, Section, is_plain_text_path  # noqa: F401 - re-exported
from tuneline.recipe.select import SelectMetric, SelectSpec  # noqa: F401 - re-exported
from tuneline.recipe.train import (  # noqa: F401 - re-exported
    METHOD_SECTIONS,
    DeepSpeedSpec,
    DistributedSpec,
    FreezeSpec,
    FsdpSpec,
    LoraSpec,
    PromptLearningSpec,
    QuantizationSpec,
    TrainSpec,
)

# How far a compressed source may unpack: see tuneline/formats/containers.py for why these numbers.
MAX_UNPACKED_BYTES = 8 * 1024**3
MAX_RATIO = 100.0
UNPACKED_BYTES_HELP = (
    "Bytes a compressed file or archive may unpack to, all members together; past it the source "
    "fails and nothing unpacked is kept."
)
RATIO_HELP = (
    "Times its compressed size a file may unpack to (judged past 1 MiB): real datasets unpack "
    "3-25x, decompression bombs about 1,000x."
)


class FileSource(Section):
    """Records in a file: a local path or any fsspec URL (file://, https://, s3://...).

    What the file is comes from its content: gzip, bz2, xz and zstd are read unpacked (within
    `max_unpacked_bytes` and `max_ratio`); zip, tar, 7z and rar archives are refused.
    """

    kind: Literal["file"] = "file"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    path: str = Field(description="Local path (relative to the project) or fsspec URL.")
    format: Format | None = Field(None, description="Record format (text: documents); detected when empty.")
    max_unpacked_bytes: int = Field(MAX_UNPACKED_BYTES, ge=1, description=UNPACKED_BYTES_HELP)
    max_ratio: float = Field(MAX_RATIO, gt=1, description=RATIO_HELP)


class UrlSource(Section):
    """A dataset file downloaded once (http, https, s3, file), checked and kept in the store.

    Interrupted HTTP downloads resume from where they stopped. What the file is comes from its
    content: gzip, bz2, xz and zstd are unpacked, zip and tar archives give their JSON and JSONL
    members, all within `max_unpacked_bytes` and `max_ratio`; 7z and rar are refused.
    """

    kind: Literal["url"] = "url"
    name: str = Field(description="Source name, kept in every record's meta.source.")
    url: str = Field(pattern=r"^(https?|s3|file)://", description="http(s)://, s3:// or file:// URL.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of the downloaded file."
    )
    format: Format | None = Field(None, description="Record format (text: documents); detected when empty.")
    retries: int = Field(4, ge=0, le=20, description="Retries on 5xx, timeouts and dropped connections.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds without data before a try fails.")
    max_unpacked_bytes: int = Field(MAX_UNPACKED_BYTES, ge=1, description=UNPACKED_BYTES_HELP)
    max_ratio: float = Field(MAX_RATIO, gt=1, description=RATIO_HELP)


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
        description="Hosts the crawl may visit, compared exactly (IP addresses in canonical form, "
        "whatever their spelling); default: hosts of the start URLs and sitemaps.",
    )
    subdomains: bool = Field(
        False,
        description="Also allow the names under each allowed name (docs.example.com for example.com); "
        "IP addresses only ever match themselves.",
    )
    allow: list[str] = Field(default_factory=list, description="Follow only URLs matching one of these.")
    deny: list[str] = Field(default_factory=list, description="Never follow URLs matching these regexes.")
    max_depth: int = Field(
        3, ge=0, description="Links followed from a start URL or a page a sitemap lists, at most."
    )
    max_pages: int = Field(1000, ge=1, description="Pages crawled, at most.")
    selectors: Literal["css", "xpath"] = Field("css", description="Language of the pair selectors.")
    pair: str | None = Field(None, description="pairs mode: selector of each question/answer block.")
    question: str | None = Field(None, description="pairs mode: question text, inside `pair` if given.")
    answer: str | None = Field(None, description="pairs mode: answer text, inside `pair` if given.")
    concurrency: int = Field(
        4, ge=1, le=64, description="Parallel requests per domain, all processes together."
    )
    processes: int = Field(
        1, ge=1, le=16,
        description="Scrapy processes sharing the crawl, one core each; each page is still fetched once.",
    )  # fmt: skip
    allow_private: bool = Field(
        False, description="Allow private, loopback and link-local addresses (local test sites only)."
    )
    redis_url: str | None = Field(
        None,
        description="Share the crawl through this Redis (redis://host:6379/0, rediss://, unix:///path): "
        "processes on every host running the same recipe with the same Redis crawl the site once, "
        "with one queue, seen-set, max_pages and concurrency; its password comes from REDISCLI_AUTH, "
        "never the URL; none: the crawl stays on this machine.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"{url.split('@')[-1]!r} is not a Redis URL; write redis://HOST:6379/0, "
                "rediss://HOST:6380/0 (TLS) or unix:///path/to/redis.sock"
            )
        if url is not None and PASSWORD_IN_URL.search(url):
            raise ValueError(
                "holds a password, which would be written to the run's recipe.yaml and stats and to the "
                "Prefect run's parameters; remove it and set REDISCLI_AUTH (the variable redis-cli "
                "reads) in the environment of every host's run"
            )
        return url

    @model_serializer(mode="wrap")
    def _omit_no_redis(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """No `redis_url` is left out of dumps, so the digests of crawls that do not set it (and
        the recipe digest a refresh compares) stay what they were."""
        data = handler(self)
        if self.redis_url is None and not (info.context or {}).get("resolved"):
            data.pop("redis_url", None)
        return data

    @field_validator("allowed_domains")
    @classmethod
    def _hosts_only(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if (
                not host.strip()
                or any(char in host for char in "/?#@ ")
                or (host.count(":") == 1 and not host.startswith("["))
            ):
                raise ValueError(
                    f"{host!r} is not a host name or address; give the host alone, without scheme, "
                    "port or path (e.g. 'docs.example.com' or '127.0.0.1')"
                )
        return hosts

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


PiiKind = Literal["email", "phone", "ip", "card", "secret"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "ip", "card", "secret")
PiiAction = Literal["redact", "drop", "report"]
PII_ACTION_HELP = (
    "redact: replace each value in every turn and tool-call argument (the same value, the same "
    "placeholder within a record); drop: drop the record as pii_{kind}; report: count it, change nothing."
)


class PiiSpec(Section):
    """What clean does with each kind of personal data it finds. Documentation values are not PII:
    example.com/.org/.net and *.example/*.test/*.invalid addresses, IPs that route nowhere public
    (RFC 5737/3849 documentation ranges, private, loopback), 555-01xx phone numbers."""

    email: PiiAction = Field(
        "redact", description=f"E-mail addresses; redact gives user1@example.com, user2@... {PII_ACTION_HELP}"
    )
    phone: PiiAction = Field(
        "redact", description=f"Phone numbers; redact gives 555-0100, 555-0101... {PII_ACTION_HELP}"
    )
    ip: PiiAction = Field(
        "redact",
        description=f"Public IP addresses; redact gives 192.0.2.1 or 2001:db8::1... {PII_ACTION_HELP}",
    )
    card: PiiAction = Field(
        "redact", description=f"Payment card numbers (Luhn-checked); redact gives <CARD>. {PII_ACTION_HELP}"
    )
    secret: PiiAction = Field(
        "redact",
        description=f"API keys, tokens, private keys, passwords; redact gives <SECRET>. {PII_ACTION_HELP}",
    )


class CleanSpec(Section):
    """Repairs, filters and dedup applied before the quality gate; every drop has a named reason."""

    normalize_text: bool = Field(True, description="Unicode NFC, unified newlines, trimmed turns.")
    fix_mojibake: bool = Field(True, description="Repair mojibake and bad escapes with ftfy.")
    strip_control: bool = Field(
        True, description="Remove control and zero-width characters; collapse runs of spaces."
    )
    html: Literal["auto", "strip", "drop", "keep"] = Field(
        "auto",
        description="HTML tags and entities. Markup that is content is never touched: inside code fences "
        "or inline code, or in a record whose user/system turns ask for markup (HTML, XML, CSS, tags...). "
        "auto: strip them only in records taken from web pages (a crawl source); strip: strip them in "
        "every record; drop: drop every record that holds them as html_remnants; keep: never look.",
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
    pii: PiiSpec = Field(
        PiiSpec(),
        description="Per kind of personal data (email, phone, ip, card, secret): redact, drop or report.",
    )
    dedup: bool = Field(True, description="Drop exact duplicates of normalized conversations.")
    near_dedup: bool = Field(True, description="Drop near duplicates found by MinHash LSH.")
    near_dedup_threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity of token n-grams that counts as near."
    )
    near_dedup_ngram: int = Field(
        5, ge=1, description="Tokens per shingle: words, or characters in Chinese, Japanese, Korean, Thai."
    )
    near_dedup_permutations: int = Field(64, ge=8, le=512, description="MinHash permutations.")
    batch_size: int = Field(10_000, ge=1, description="Records processed per batch (memory stays flat).")
    workers: int = Field(
        2, ge=1, le=64, description="Processes repairing and hashing batches in parallel (1: none)."
    )
    executor: Literal["local", "dask"] = Field(
        "local",
        description="Where batches (shards) are cleaned. local: `workers` processes of this machine. "
        "dask: the workers of a Dask cluster (`dask_address`); exact and near dedup stay global, decided "
        "on this machine, so the records kept and the drop reasons are the same as local, and the clean "
        "stage's digest does not change (a stage written by either is reused by the other).",
    )
    dask_address: str | None = Field(
        None,
        description="With executor dask: a running Dask scheduler, e.g. tcp://scheduler:8786 (its workers "
        "need this Tuneline version installed). Unset: a local Dask cluster of `workers` processes, one "
        "thread each, closed when the stage ends.",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> CleanSpec:
        if self.dask_address is not None and self.executor != "dask":
            raise ValueError(
                f"clean.dask_address {self.dask_address!r} is set but clean.executor is "
                f"{self.executor!r}; set clean.executor: dask to use that cluster, or remove dask_address"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_local_executor(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """The default executor (and no address) is left out of dumps, so recipe digests of recipes
        that do not set them stay what they were; `context={"resolved": True}` writes them."""
        data = handler(self)
        if not (info.context or {}).get("resolved"):
            if self.executor == "local":
                data.pop("executor", None)
            if self.dask_address is None:
                data.pop("dask_address", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _redact_pii_list(cls, data: Any) -> Any:
        """The old `redact_pii: [kinds]` still loads: listed kinds redact, the others report."""
        if not isinstance(data, dict) or "redact_pii" not in data:
            return data
        if "pii" in data:
            raise ValueError("clean.redact_pii: replaced by clean.pii, and both are set; keep only `pii`")
        kinds = data["redact_pii"]
        warnings.warn(
            "recipe: clean.redact_pii is now clean.pii (per kind: redact, drop or report); "
            f"{kinds!r} still loads as listed kinds redact, the others report",
            FutureWarning,
            stacklevel=2,
        )
        listed = set(kinds) if isinstance(kinds, list) else set()
        rest = {key: value for key, value in data.items() if key != "redact_pii"}
        return {**rest, "pii": {kind: "redact" if kind in listed else "report" for kind in PII_KINDS}}


class GateSpec(Section):
    """The quality gate: a Great Expectations suite from expectations/ and its thresholds."""

    suite: str = Field("conversations", description="Suite file name in expectations/ (without .json).")
    min_records: int = Field(10, ge=1, description="Fewer records than this fail the gate.")
    min_chars: int = Field(
        1,
        ge=0,
        description="Shortest allowed user and assistant turn (stripped; a tool call counts as text). "
        "1 lets one-character labels ('A', '5') and words ('嗨') through; raise it for free-text answers.",
    )
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
    mostly: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Share of rows each row-level check must pass. The gate judges the dataset: one bad "
        "record is for clean to drop with its reason; 1.0 fails the run on a single row.",
    )
    examples: int = Field(3, ge=0, le=50, description="Failing rows shown per failed expectation.")


class SplitSpec(Section):
    """Deterministic train/validation/test split, by hashing each record id with the seed."""

    validation: float = Field(0.1, ge=0, lt=1, description="Share of records for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Share of records held out for the test split.")
    seed: int = Field(0, description="Changing the seed re-deals the records.")
    decontaminate: bool = Field(
        True, description="Drop training records sharing a long n-gram with validation, test or benchmarks."
    )
    decontaminate_ngram: int = Field(
        13, ge=3, description="Words per n-gram for decontamination (Chinese, Thai...: 2 characters a word)."
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Benchmark prompt files (dataset files, or .txt: one prompt a line) kept out.",
    )
    test_file: str | None = Field(
        None,
        description="A file of records (any supported format) that is the test split, exactly and "
        "unchanged: records of the data with the same content are kept out of train and validation "
        "(dropped as in_test_file), and records the `test` share would hold out train instead. Keeps "
        "the test set fixed while the data changes (the refresh flow pins one itself when unset).",
    )

    @model_serializer(mode="wrap")
    def _omit_no_test_file(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """An unset `test_file` is left out of dumps, so split digests of recipes without one stay
        what they were; `context={"resolved": True}` writes it."""
        data = handler(self)
        if self.test_file is None and not (info.context or {}).get("resolved"):
            data.pop("test_file", None)
        return data

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

    name: str = Field(
        description="Hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct), local folder, or a GGUF file: a local "
        "`.gguf` path or `<owner>/<repo>:<file>.gguf`, dequantized once into the base_model stage."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a model ships (its config.json's auto_map) to load it; "
        "only for a model whose code you trust.",
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Also load weights saved with pickle (pytorch_model.bin, *.pt) when a model has no "
        "safetensors; a pickle file can run code as it loads, so by default only safetensors load.",
    )
    candidates: list[str] = Field(
        [],
        description="Base models to choose from before training (hub names, folders, GGUF files), each "
        "scored on the validation split by the `select` section's rule; `name` is a candidate too (put "
        "first when not listed). The other fields apply to every candidate, `revision` to `name` only.",
    )

    @model_serializer(mode="wrap")
    def _omit_no_candidates(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """An empty `candidates` is left out of dumps, so the digests of recipes without candidates
        (every stage keyed on the model) stay what they were; `context={"resolved": True}` writes it."""
        data = handler(self)
        if not self.candidates and not (info.context or {}).get("resolved"):
            data.pop("candidates", None)
        return data


class Guardrails(Section):
    """Checks that refuse a promotion even when the promote metric wins (tuneline/register/guardrails.py)."""

    max_regression: float | None = Field(
        None,
        ge=0,
        description="Refuse if any benchmark (evaluate.benchmarks) drops more than this many points "
        "(percentage points, 0-100) from the base model to the tuned one.",
    )
    min_suite_pass_rate: float | None = Field(
        None, ge=0, le=1, description="Refuse if the tuned model's test-suite pass rate is below this share."
    )
    min_judge_win_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Refuse if the tuned model's win rate (ties count half) by the judge (evaluate.judge) "
        "against base or champion is below this share.",
    )
    min_human_win_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Refuse if the tuned model's win rate in people's comparisons (evaluate.human) "
        "against base or champion is below this share.",
    )


RETENTION_DAYS = 15  # as ModelStudio, which clears models that were not exported after 15 days


class RegisterSpec(Section):
    """MLflow registration and the promotion rule for the `champion` alias."""

    model_name: str = Field(description="Registered model name in MLflow.")
    tracking_uri: str = Field(
        "sqlite:///.tuneline/mlflow.db",
        description="MLflow tracking URI. Unset, it follows artifacts_dir: "
        "sqlite:///<artifacts_dir>/mlflow.db. A team's store: postgresql://USER@HOST:5432/DATABASE "
        "(the password from PGPASSWORD or ~/.pgpass, never in the URI) or an MLflow server's http(s):// URL.",
    )
    experiment: str = "tuneline"
    promote_metric: PromoteMetric = Field(
        "exact_match", description="The tuned model's metric compared with the champion's (loss: lower wins)."
    )
    margin: float = Field(0.0, ge=0, description="How much the candidate must beat the champion by.")
    guardrails: Guardrails = Field(
        Guardrails(), description="Checks that can refuse a promotion the promote metric would allow."
    )
    retention_days: int = Field(
        RETENTION_DAYS,
        ge=1,
        description="Days after training that the `retention` flow removes a trained model (its train "
        "stage, the stages built from it, its MLflow versions) unless an alias or an export keeps it.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, uri: str) -> str:
        """The URI is written to recipe.yaml, stage stats and the Prefect run's parameters."""
        if PASSWORD_IN_URL.search(uri):
            raise ValueError(
                "holds a password, which would be written to the run's recipe.yaml and stats and to the "
                "Prefect run's parameters; remove it and set PGPASSWORD or ~/.pgpass (PostgreSQL), or "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (an MLflow server)"
            )
        return uri

    @model_serializer(mode="wrap")
    def _omit_default_retention(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """The default `retention_days` is left out of dumps, so the digests of recipes that do not
        set it stay what they were; `context={"resolved": True}` writes it (recipe.yaml, params)."""
        data = handler(self)
        if self.retention_days == RETENTION_DAYS and not (info.context or {}).get("resolved"):
            data.pop("retention_days", None)
        return data


# The password of a URL with credentials (scheme://user:password@host), hidden in error messages.
PASSWORD_IN_URL = re.compile(r"(://[^/@:\s\"]*:)[^@/\s\"]+@")


# `register` is the stage's name everywhere. As a field it shadows ABCMeta.register, which
# pydantic would take as its default: the explicit `Field(...)` below keeps it required.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


# Old section name -> new name: old recipes and saved deployment parameters keep loading.
RENAMED_SECTIONS = {"quality": "gate"}


class Recipe(Section):
    """A whole fine-tuning project, from sources to a registered model."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Project name.")
    description: str = Field(
        "",
        description="What this fine-tuning task is for, in a sentence; shown by `tuneline runs list` "
        "and logged with the run's params (a changed description registers the model again).",
    )
    artifacts_dir: str = Field(
        ".tuneline",
        description="Where stage artifacts are stored: a local folder, or an object store URL "
        "(s3://BUCKET/PREFIX; gs:// or az:// with gcsfs or adlfs installed) that several machines "
        "share. Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL for an S3-compatible server), never the URL.",
    )
    local_dir: str | None = Field(
        None,
        description="With an object store as artifacts_dir: this machine's folder for the stages it "
        "read or wrote, its locks, checkpoints, Prefect server and MLflow SQLite file. Unset: "
        ".tuneline/stores/<scheme>/<bucket>/<prefix>. Ignored for a local artifacts_dir.",
    )
    sources: list[Source] = Field(min_length=1)
    augment: AugmentSpec | None = Field(
        None, description="Teacher-generated examples in reviewed rounds, added before cleaning."
    )
    clean: CleanSpec = CleanSpec()
    gate: GateSpec = GateSpec()
    split: SplitSpec = SplitSpec()
    model: ModelSpec
    pretrain: PretrainSpec | None = Field(
        None, description="Continued pre-training on documents before `train`, which then starts from it."
    )
    select: SelectSpec = Field(
        SelectSpec(), description="How the base model is chosen among `model.candidates` (before training)."
    )
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    register: RegisterSpec = Field(...)
    refresh: RefreshSpec | None = Field(
        None,
        description="The schedule of the `refresh` flow (cron or interval): re-fetch the sources and "
        "retrain only when the collected data changed. `tuneline deploy` schedules it.",
    )

    @model_serializer(mode="wrap")
    def _omit_no_description(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """An empty `description` (and an unset `refresh`) is left out of dumps, so the digests of
        recipes without one stay what they were; `context={"resolved": True}` writes it (the run's
        recipe.yaml, params)."""
        data = handler(self)
        if not self.description and not (info.context or {}).get("resolved"):
            data.pop("description", None)
        if self.refresh is None and not (info.context or {}).get("resolved"):
            data.pop("refresh", None)
        if self.local_dir is None:
            data.pop("local_dir", None)
        return data

    @property
    def work_dir(self) -> str:
        """This machine's artifacts folder: artifacts_dir itself, or for an object store the local
        folder bound to it (tuneline.objectstore.bind, when a run starts)."""
        return local_artifacts_dir(self.artifacts_dir, self.local_dir)

    def digest(self) -> str:
        """Content digest of the recipe, without `refresh` (when it runs decides no stage's output,
        so a new schedule registers no model again) and `local_dir` (which folder of which machine
        holds copies of the object store's stages)."""
        text = json.dumps(self.model_dump(mode="json", exclude={"refresh", "local_dir"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data: Any) -> Any:
        """Sections under their old names still load, with a message saying the new one."""
        if not isinstance(data, dict):
            return data
        for old, new in RENAMED_SECTIONS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old}: renamed {new}, and both are set; keep only `{new}`")
                warnings.warn(
                    f"recipe: the `{old}` section is now called `{new}`; rename it (it still loads)",
                    FutureWarning,
                    stacklevel=2,
                )
                data = {(new if key == old else key): value for key, value in data.items()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _tracking_follows_artifacts(cls, data: Any) -> Any:
        """MLflow's SQLite store lies in the artifacts folder unless the recipe names a tracking URI,
        so a run with another artifacts_dir does not register into the project's model."""
        if not isinstance(data, dict):
            return data
        register = data.get("register")
        folder = local_artifacts_dir(str(data.get("artifacts_dir", ".tuneline")), data.get("local_dir"))
        uri = f"sqlite:///{folder.rstrip('/')}/mlflow.db"
        if isinstance(register, dict) and "tracking_uri" not in register:
            return {**data, "register": {**register, "tracking_uri": uri}}
        if isinstance(register, RegisterSpec) and "tracking_uri" not in register.model_fields_set:
            return {**data, "register": register.model_copy(update={"tracking_uri": uri})}
        return data

    @field_validator("artifacts_dir")
    @classmethod
    def _known_object_store(cls, value: str) -> str:
        if is_url(value):
            check_url(value)
        return value

    @model_validator(mode="after")
    def _unique_source_names(self) -> Recipe:
        names = [source.name for source in self.sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _promote_metric_is_computed(self) -> Recipe:
        if problem := promote_metric_problem(self.evaluate, self.register.promote_metric):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _guardrails_have_evidence(self) -> Recipe:
        """A guardrail reads what an evaluate setting measures: without it, it could only refuse."""
        guardrails, evaluate = self.register.guardrails, self.evaluate
        needs = {
            "max_regression": ("benchmarks", evaluate.benchmarks),
            "min_suite_pass_rate": ("suites", evaluate.suites),
            "min_judge_win_rate": ("judge", evaluate.judge),
            "min_human_win_rate": ("human", evaluate.human),
        }
        for name, (setting, value) in needs.items():
            if getattr(guardrails, name) is not None and not value:
                raise ValueError(
                    f"register.guardrails.{name} reads evaluate.{setting}, which is not set: "
                    f"set evaluate.{setting}, or drop the guardrail"
                )
        return self

    @model_validator(mode="after")
    def _select_has_candidates(self) -> Recipe:
        if self.select != SelectSpec() and not self.model.candidates:
            raise ValueError(
                "select: set, but model.candidates is empty, so there is nothing to choose from; "
                "list the base models to compare in model.candidates, or remove the select section"
            )
        if self.select.metric == "schema_match" and not self.evaluate.json_schema:
            raise ValueError(
                "select.metric is schema_match, which needs a JSON Schema: set evaluate.json_schema "
                "to a schema file, or choose another metric"
            )
        if self.select.metric == "suite_pass_rate" and not self.evaluate.suites:
            raise ValueError(
                "select.metric is suite_pass_rate but evaluate.suites is empty: add a test suite, "
                "or choose another metric"
            )
        return self

    @model_validator(mode="after")
    def _augment_has_documents(self) -> Recipe:
        grounded = self.augment is not None and self.augment.mode == "documents"
        if grounded and not any(_holds_documents(source) for source in self.sources):
            raise ValueError(
                "augment.mode documents needs collected documents: add a crawl source with mode: documents, "
                "or a text source (a .txt/.md file, or format: text)"
            )
        return self


def _holds_documents(source: Source) -> bool:
    """Whether a source yields documents: a crawl in documents mode, or text (format or file name)."""
    match source:
        case CrawlSource():
            return source.mode == "documents"
        case FileSource():
            return source.format == "text" or is_plain_text_path(source.path)
        case UrlSource():
            return source.format == "text" or is_plain_text_path(source.url)
    return source.format == "text"


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
    shown = PASSWORD_IN_URL.sub(r"\1***@", json.dumps(value, default=str))  # user:***@host
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
    resolved = recipe.model_dump(mode="json", context={"resolved": True})
    return yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)


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

    walk("", recipe.model_dump(mode="json", context={"resolved": True}))
    return flat
