"""Experiment: does near-dedup find a one-character (Chinese) or one-word (English) edit?

Takes 200 records of LLaMA-Factory's `alpaca_zh_demo.json` and `alpaca_en_demo.json` (seeded
sample), adds a copy of each whose answer has one character (zh) or one word (en) replaced, and
runs the clean stage's `Cleaner` with the default CleanSpec over originals then copies. Prints,
per language, how many copies were dropped as `near_duplicate` out of those whose original was
kept and that no other step dropped, and how many originals were (wrongly) near each other.

    python bench/near_dedup_languages.py [--data ../shared/data/llamafactory] [--seed 0]

A language whose file is absent is skipped with a message (the shared data may not be there).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory"
SAMPLE = 200


def change_one_character(text: str, rng: random.Random) -> str:
    """Replace one CJK character of the text by another one (what a copy-edit does in Chinese)."""
    positions = [i for i, ch in enumerate(text) if "\u4e00" <= ch <= "\u9fff"]
    if not positions:
        return text + "。"
    index = rng.choice(positions)
    replacement = chr(0x4E00 + (ord(text[index]) - 0x4E00 + rng.randrange(1, 20_000)) % 0x5200)
    return text[:index] + replacement + text[index + 1 :]


def change_one_word(text: str, rng: random.Random) -> str:
    """Replace one space-separated word of the text by another one."""
    words = text.split(" ")
    index = rng.randrange(len(words))
    words[index] = rng.choice([w for w in ("the", "a", "this", "that", "one", "blue") if w != words[index]])
    return " ".join(words)


def experiment(path: Path, seed: int) -> tuple[int, int, int]:
    """(copies found, copies eligible, originals flagged) for one demo file."""
    from tuneline.curate.clean import Cleaner
    from tuneline.formats import read_records
    from tuneline.recipe import CleanSpec
    from tuneline.records import make_record

    rng = random.Random(seed)
    records = rng.sample(read_records(path, "alpaca").records, SAMPLE)
    change = change_one_character if "_zh_" in path.name else change_one_word
    copies = []
    for record in records:
        *turns, answer = record["messages"]
        copies.append(make_record([*turns, {**answer, "content": change(answer["content"], rng)}]))
    results = Cleaner(CleanSpec(workers=1)).clean_batch(records + copies)
    originals, edited = results[:SAMPLE], results[SAMPLE:]
    eligible = [
        copy_reason
        for (_, original_reason), (_, copy_reason) in zip(originals, edited, strict=True)
        if original_reason is None and copy_reason in (None, "near_duplicate")
    ]
    flagged = sum(reason == "near_duplicate" for _, reason in originals)
    return eligible.count("near_duplicate"), len(eligible), flagged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the alpaca_*_demo.json files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for language in ("zh", "en"):
        path = args.data / f"alpaca_{language}_demo.json"
        if not path.is_file():
            print(f"{language}: skipped, {path} not found (LLaMA-Factory's data/ folder has it)")
            continue
        found, eligible, flagged = experiment(path, args.seed)
        print(
            f"{language}: near duplicates found {found} of {eligible} ({found / max(eligible, 1):.0%}); "
            f"originals flagged as near each other: {flagged}"
        )


if __name__ == "__main__":
    main()
