"""The base of every recipe section, and field types shared by the recipe's modules."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

Format = Literal["alpaca", "sharegpt", "openai", "prompt_completion", "self_instruct", "text"]


class Section(BaseModel):
    """Base of every recipe section: frozen, and unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Content digest of the section: what stage caching keys on."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
