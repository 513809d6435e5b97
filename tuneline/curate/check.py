"""Check one dataset file outside a flow: the same reading, cleaning and quality gate as a run.

`check_file` streams the file through the readers (unreadable records as `FILE:LINE: reason`),
the clean stage's `Cleaner` in batches, and the recipe's quality suite over what survives. Kept
records wait in a temporary JSON-lines file, so memory stays flat; nothing is written to the
artifact store.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.curate.clean import Cleaner, batches
from tuneline.curate.gate import GateFailed, check_records
from tuneline.formats import Format, iter_file
from tuneline.recipe import CleanSpec, GateSpec, ModelSpec
from tuneline.records import Record


@dataclass
class CheckReport:
    """What `tuneline data check` prints: the funnel of one file and the gate's verdict."""

    path: str
    records_in: int = 0
    unreadable: list[str] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    clean_stats: dict[str, Any] = field(default_factory=dict)
    gate_failures: list[str] = field(default_factory=list)
    gate_expectations: int = 0

    @property
    def passed(self) -> bool:
        return not self.gate_failures


def _readable(path: str, format: Format | None, report: CheckReport) -> Iterator[Record]:
    for item in iter_file(path, format):
        report.records_in += 1
        if item.record is None:
            report.unreadable.append(f"{path}:{item.line}: {item.reason}")
        else:
            yield item.record


def check_file(
    path: str,
    clean: CleanSpec,
    gate: GateSpec,
    model: ModelSpec | None = None,
    format: Format | None = None,
) -> CheckReport:
    """Read, clean and gate one file; raises FormatError/OSError when the file itself is unusable."""
    report = CheckReport(path)
    cleaner = Cleaner(clean, model)
    with tempfile.TemporaryDirectory(prefix="tuneline-check-") as tmp:
        kept_path = Path(tmp) / "kept.jsonl"
        with open(kept_path, "w", encoding="utf-8") as kept:
            for batch in batches(_readable(path, format, report), clean.batch_size):
                for record, reason in cleaner.clean_batch(batch):
                    if reason:
                        report.dropped[reason] += 1
                    else:
                        kept.write(json.dumps(record, ensure_ascii=False) + "\n")
                        report.kept += 1
        report.clean_stats = cleaner.stats()

        def kept_records() -> Iterator[Record]:
            with open(kept_path, encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)

        try:
            _, summary, _ = check_records(kept_records, gate, None)
            report.gate_expectations = len(summary)
        except GateFailed as failed:
            report.gate_failures = failed.failures
    return report
