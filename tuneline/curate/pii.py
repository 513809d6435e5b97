"""PII redaction: emails, phone numbers, IP addresses, card numbers and secrets become placeholders.

Each kind is one anchored regex (`\\b` on both sides, bounded repetitions: an unanchored pattern
took seconds on one long string). Card numbers must also pass the Luhn check, so order numbers
and timestamps stay. Secrets are found by detect-secrets' rules (tuneline.curate.secrets), plus
the key formats it has no rule for (below). Redaction keeps the record and counts what it
replaced by kind.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable

from tuneline.curate.secrets import redact_secrets

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP>",
    "card": "<CARD>",
    "secret": "<SECRET>",
}
# Order matters: secrets and cards before phones, so a key or card is not half-taken as a phone.
PATTERNS: dict[str, re.Pattern[str]] = {
    # Key formats detect-secrets 1.5 has no rule for, as gitleaks writes them (rule ids openai-api-key
    # without its T3BlbkFJ marker, gcp-api-key, huggingface-access-token, github-fine-grained-pat).
    "secret": re.compile(
        r"(?<![\w-])(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,200}|AIza[\w-]{35}|hf_[A-Za-z0-9]{30,100}"
        r"|github_pat_\w{82})(?![\w-])"
    ),
    "email": re.compile(
        r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b"
    ),
    "card": re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
    "ip": re.compile(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
        r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"
    ),
    # A separator after the area code is required, so bare order numbers and ids stay.
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}[ .-]?\d{3,4}\b"),
}
# A cheap necessary condition per kind first, with C-speed string methods (a full regex scan
# costs ~13 ns a character): the number of digits each pattern needs at least, '@', key prefixes.
_CARD_HINT = re.compile(r"\d{4}[ -]?\d{4}[ -]?\d{4}")
_IP_HINT = re.compile(r"\d\.\d{1,3}\.\d")
_PHONE_HINT = re.compile(r"[\d)][ .-]\d{3}")
SECRET_PREFIXES = ("sk-", "AIza", "hf_", "github_pat_")
PRECHECKS: dict[str, Callable[[str, int], bool]] = {
    "secret": lambda text, digits: any(prefix in text for prefix in SECRET_PREFIXES),
    "email": lambda text, digits: "@" in text,
    "card": lambda text, digits: digits >= 13 and _CARD_HINT.search(text) is not None,
    "ip": lambda text, digits: (digits >= 4 and _IP_HINT.search(text) is not None) or text.count(":") >= 7,
    "phone": lambda text, digits: digits >= 8 and _PHONE_HINT.search(text) is not None,
}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return PLACEHOLDERS["card"] if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group()


def redact_text(text: str, kinds: Iterable[str], counts: Counter[str]) -> str:
    """The text with every PII match of the given kinds replaced; `counts` gains one per match."""
    if "secret" in kinds:  # first, so a key in a URL or a config line is not half-taken as PII
        text, replaced = redact_secrets(text, PLACEHOLDERS["secret"])
        if replaced:
            counts["secret"] += replaced
    digits = sum(map(text.count, "0123456789"))
    for kind in PATTERNS:
        if kind not in kinds or not PRECHECKS[kind](text, digits):
            continue
        replace: Callable[[re.Match[str]], str]
        if kind == "card":
            replace = _card
        else:
            placeholder = PLACEHOLDERS[kind]

            def replace(match: re.Match[str], placeholder: str = placeholder) -> str:
                return placeholder

        before = text
        text, replaced = PATTERNS[kind].subn(replace, text)
        if kind == "card":
            replaced = text.count(PLACEHOLDERS["card"]) - before.count(PLACEHOLDERS["card"])
        if replaced:
            counts[kind] += replaced
    return text
