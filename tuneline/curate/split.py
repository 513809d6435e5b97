"""The split stage: deterministic train/validation/test by hashing each record's id with a seed,
then decontamination of the training split.

A record's split depends only on its content and the seed, never on file order or on which
other records exist, so adding data does not move old test records into training.

Decontamination needs the held-out splits, so it happens here: a first pass deals the records
and collects the token n-gram hashes (`split.decontaminate_ngram` words, or twice as many
characters in scripts written without spaces, see `tuneline.curate.shingles`) of validation, test and
the recipe's benchmark prompt files; a second pass drops every training record that shares one
of them (`contaminated`, in the ledger and rejects). The held-out n-grams are kept as one sorted
numpy array of uint64 (8 bytes each), so memory follows the held-out size, not the training size.

With `split.test_file` the test split is that file's records, the same set whatever the data
becomes (what the refresh flow compares models on): gated records with the same content (id) are
dropped as `in_test_file`, and the file's n-grams are held out like any test record's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from tuneline.curate.shingles import ngram_hashes
from tuneline.errors import UserError
from tuneline.formats import FormatError, iter_file
from tuneline.pipeline import SPLIT
from tuneline.recipe import SplitSpec
from tuneline.records import comparable_text
from tuneline.store import (
    RECORDS,
    StageRef,
    StageWriter,
    files_digest,
    iter_records,
    reuse_or_write,
    stage_key,
)

SPLITS = ("train", "validation", "test")
# One shared n-gram is enough to drop a record, so the n-gram must span as much text in every
# language: two characters weigh one word. With single characters, 13-grams such as
# "一个由 {{author}} 开发的人工智能助手" dropped 29 of identity.json's 66 training records, where
# the same answers in English share no 13 words.
CHARACTERS_PER_WORD = 2
BATCH = 5_000


class BenchmarkFileError(UserError, ValueError):
    """A benchmark prompt file named in `split.benchmarks` that cannot be read."""


class TestFileError(UserError, ValueError):
    """The file of `split.test_file` that is missing, unreadable or empty."""

    __test__ = False  # not a pytest test class


def assign_split(record_id: str, spec: SplitSpec) -> str:
    """Which split a record belongs to: a stable position in [0, 1) from its id and the seed."""
    position = int(hashlib.sha256(f"{spec.seed}:{record_id}".encode()).hexdigest()[:12], 16) / 16**12
    if position < spec.test:
        return "test"
    if position < spec.test + spec.validation:
        return "validation"
    return "train"


def _batched(texts: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(islice(texts, BATCH)):
        yield batch


def benchmark_texts(path: str) -> Iterator[str]:
    """The prompts of a benchmark file: one per line of a .txt file, else every record's text."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as handle:
                yield from (line for line in handle if line.strip())
            return
        for item in iter_file(path):
            if item.record is not None:
                yield comparable_text(item.record)
    except (OSError, FormatError) as error:
        raise BenchmarkFileError(f"split.benchmarks: cannot read {path}: {error}; fix the path") from None


class HeldOutNgrams:
    """The n-gram hashes of every held-out text, collected in batches, queried per record."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._parts: list[np.ndarray] = []
        self.index = np.zeros(0, dtype=np.uint64)

    def add(self, texts: list[str]) -> None:
        hashes, _ = ngram_hashes(texts, self.n, False, CHARACTERS_PER_WORD)
        self._parts.append(np.unique(hashes))

    def freeze(self) -> None:
        self.index = np.unique(np.concatenate(self._parts)) if self._parts else self.index
        self._parts = []

    def contaminated(self, texts: list[str]) -> list[bool]:
        """Whether each text shares at least one n-gram with the held-out texts."""
        hashes, offsets = ngram_hashes(texts, self.n, False, CHARACTERS_PER_WORD)
        if not self.index.size or not hashes.size:
            return [False] * len(texts)
        positions = np.minimum(np.searchsorted(self.index, hashes), self.index.size - 1)
        hits = self.index[positions] == hashes
        running = np.concatenate(([0], np.cumsum(hits, dtype=np.int64)))
        return (running[offsets[1:]] - running[offsets[:-1]] > 0).tolist()


def read_test_file(path: str) -> list[dict]:
    """The records of `split.test_file`, as they are (not cleaned); an unreadable line is an error
    naming the file and line, since a test set with a hole would not stay the same set."""
    if not Path(path).is_file():
        raise TestFileError(
            f"split.test_file: {path} does not exist (paths are relative to the project folder, "
            f"{Path.cwd()}); fix the path, or remove split.test_file to hold out a share of the data"
        )
    records = []
    try:
        for item in iter_file(path):
            if item.record is None:
                raise TestFileError(f"split.test_file: {path}:{item.line}: {item.reason}; fix or remove it")
            records.append(item.record)
    except (OSError, FormatError) as error:
        raise TestFileError(f"split.test_file: cannot read {path}: {error}; fix the file") from None
    if not records:
        raise TestFileError(f"split.test_file: {path} holds no records; name a file of test records")
    return records


def deal(record: dict, spec: SplitSpec, test_ids: set[str] | None) -> str:
    """A gated record's split; with a test file, `in_test_file` for a record the file holds, and
    train for one the `test` share would have held out (the file is the test split)."""
    if test_ids is None:
        return assign_split(record["id"], spec)
    if record["id"] in test_ids:
        return "in_test_file"
    name = assign_split(record["id"], spec)
    return "train" if name == "test" else name


def run_split(artifacts_dir: str | Path, gated: StageRef, spec: SplitSpec) -> StageRef:
    """Deal the gated records into train.jsonl, validation.jsonl and test.jsonl (or take the test
    split from `split.test_file`), then drop training records that overlap the held-out splits or
    the benchmark files."""
    benchmark_files = [Path(p) for p in spec.benchmarks]
    missing = [str(p) for p in benchmark_files if not p.is_file()]
    if missing:
        raise BenchmarkFileError(f"split.benchmarks: {missing} do not exist; fix the paths")
    test_records = read_test_file(spec.test_file) if spec.test_file else None
    parts = [spec, gated.digest, files_digest(*benchmark_files)]
    if test_records is not None:  # the key of a recipe without a test file stays what it was
        parts.append(files_digest(spec.test_file))
    digest = stage_key(SPLIT, *parts)
    test_ids = {record["id"] for record in test_records} if test_records is not None else None

    def write(writer: StageWriter) -> None:
        held_out = HeldOutNgrams(spec.decontaminate_ngram)
        counts = dict.fromkeys(SPLITS, 0)
        pending: list[str] = []
        if test_records is not None:
            write_test_file(writer, test_records)
            counts["test"] = len(test_records)
            if spec.decontaminate:
                held_out.add([comparable_text(record) for record in test_records])
        for record in iter_records(gated, RECORDS):
            writer.count_in()
            name = deal(record, spec, test_ids)
            if name == "in_test_file":
                writer.drop(record, "in_test_file")
                continue
            if name == "train":
                continue  # dealt in the second pass, once every held-out n-gram is known
            writer.keep(record, f"{name}.jsonl")
            counts[name] += 1
            if spec.decontaminate:
                pending.append(comparable_text(record))
                if len(pending) >= BATCH:
                    held_out.add(pending)
                    pending = []
        if spec.decontaminate:
            held_out.add(pending)
            for path in spec.benchmarks:
                for batch in _batched(benchmark_texts(path)):
                    held_out.add(batch)
            held_out.freeze()
        train = (r for r in iter_records(gated, RECORDS) if deal(r, spec, test_ids) == "train")
        while batch := list(islice(train, BATCH)):
            flags = held_out.contaminated([comparable_text(r) for r in batch]) if spec.decontaminate else []
            for index, record in enumerate(batch):
                if flags and flags[index]:
                    writer.drop(record, "contaminated")
                else:
                    writer.keep(record, "train.jsonl")
                    counts["train"] += 1
        for name in SPLITS:  # an empty split is still a file, so readers need no special case
            writer.path(f"{name}.jsonl").touch()
        writer.stats = {
            "counts": counts,
            "contaminated": writer.dropped.get("contaminated", 0),
            "decontaminate_ngram": spec.decontaminate_ngram if spec.decontaminate else None,
            "held_out_ngrams": int(held_out.index.size),
            "benchmarks": list(spec.benchmarks),
            **({"test_file": spec.test_file, "in_test_file": writer.dropped.get("in_test_file", 0)}
               if spec.test_file else {}),
        }  # fmt: skip

    return reuse_or_write(artifacts_dir, SPLIT, digest, write, [gated])


def write_test_file(writer: StageWriter, records: list[dict]) -> None:
    """The test file's records as the stage's test.jsonl. They are not the gated records, so they
    stay out of the stage's ledger (which counts what the gate gave); stats count them."""
    with open(writer.path("test.jsonl"), "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
