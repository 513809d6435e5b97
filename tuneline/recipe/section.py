"""The base of every recipe section, and field types shared by the recipe's modules."""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict

Format = Literal["alpaca", "sharegpt", "openai", "prompt_completion", "self_instruct", "text"]
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")


def bare_name(path: str) -> str:
    """A file's name without folders and a compression suffix."""
    name = PurePosixPath(str(path)).name
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def is_plain_text_path(path: str) -> bool:
    """Whether a path names a plain text file (`.txt`, `.md`, also compressed): one document.

    Here, not in tuneline.formats, because the recipe checks it and may not import formats."""
    return bare_name(path).lower().endswith(PLAIN_TEXT_SUFFIXES)


class Section(BaseModel):
    """Base of every recipe section: frozen, and unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Content digest of the section: what stage caching keys on."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
