"""Personal data in records: e-mail addresses, phone numbers, IP addresses, card numbers, secrets.

Each kind is one anchored regex (`\\b` on both sides, bounded repetitions: an unanchored pattern
took seconds on one long string). Card numbers must also pass the Luhn check, so order numbers
and timestamps stay. Secrets are found by detect-secrets' rules (tuneline.curate.secrets), plus
the key formats it has no rule for (below).

Values reserved for documentation identify nobody and are not PII: example.com/.org/.net and
*.example/*.test/*.invalid addresses (RFC 2606/6761), IP addresses that route nowhere public
(RFC 5737 and 3849 documentation ranges, private, loopback, reserved), 555-01xx phone numbers.

The recipe says per kind what happens to a find (`clean.pii`): redact, drop the record, or
report (count it, change nothing). A redacted record stays a valid record of its kind: the same
value gets the same placeholder in every turn and tool-call argument of the record, arguments
and tool results that are JSON are redacted string by string (still valid JSON, same keys and
types), and the placeholder is a documentation value of the same kind where one exists
(user1@example.com, 555-0100, 192.0.2.1), so a tool call still copies the address the user gave.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tuneline.curate.secrets import redact_secrets

# Kinds without a documentation range get a tag; it stays a string inside JSON arguments.
TAGS = {"card": "<CARD>", "secret": "<SECRET>"}
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
    # A separator after the area code is required, so bare order numbers and ids stay; no dotted
    # number goes on after it, so part of an IP address (255.255.255.0) is not a phone.
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}[ .-]?\d{3,4}\b(?!\.\d)"
    ),
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
DOCUMENTATION_DOMAINS = ("example.com", "example.org", "example.net")
DOCUMENTATION_TLDS = (".example", ".test", ".invalid")
# 555-0100 to 555-0199: the North American numbers reserved for fiction and documentation.
DOCUMENTATION_PHONE = re.compile(r"55501\d\d$")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def is_pii(kind: str, value: str) -> bool:
    """Whether a pattern's match is personal data: cards pass Luhn; documentation values are not."""
    if kind == "email":
        domain = value.rsplit("@", 1)[1].lower()
        documentation = domain in DOCUMENTATION_DOMAINS or domain.endswith(
            tuple(f".{d}" for d in DOCUMENTATION_DOMAINS) + DOCUMENTATION_TLDS
        )
        return not documentation
    if kind == "ip":
        try:
            return ipaddress.ip_address(value).is_global
        except ValueError:  # leading zeros ("010.1.2.3"): not an address Python accepts, keep it safe
            return True
    if kind == "phone":
        return DOCUMENTATION_PHONE.search(re.sub(r"\D", "", value)) is None
    if kind == "card":
        digits = re.sub(r"\D", "", value)
        return 13 <= len(digits) <= 19 and luhn_valid(digits)
    return True


class Redactor:
    """Finds PII in the texts of one record and applies the recipe's action per kind.

    `found` counts every find by kind; `text()` and `json_text()` return the text with the finds
    of `redact` kinds replaced. One value gets one placeholder throughout the record; placeholders
    already in the record (`taken`) are skipped, so two people never merge into one.
    """

    def __init__(self, actions: Mapping[str, str], taken: Callable[[], str] = str) -> None:
        self.actions = actions
        self.found: Counter[str] = Counter()
        self._taken = taken
        self._taken_text: str | None = None
        self._assigned: dict[tuple[str, str], str] = {}
        self._numbers: Counter[str] = Counter()

    def text(self, text: str) -> str:
        """The text with the finds of `redact` kinds replaced, every find counted."""
        if "secret" in self.actions:  # first, so a key in a URL or a config line is not half-taken
            redacted, replaced = redact_secrets(text, TAGS["secret"])
            if replaced:
                self.found["secret"] += replaced
                text = redacted if self.actions["secret"] == "redact" else text
        digits = sum(map(text.count, "0123456789"))
        for kind, pattern in PATTERNS.items():
            if kind in self.actions and PRECHECKS[kind](text, digits):
                text = pattern.sub(lambda match, kind=kind: self._replace(kind, match.group()), text)
        return text

    def json_text(self, text: str) -> str:
        """JSON text of an object or array redacted string by string (keys and types stay);
        any other text as `text()` does."""
        try:
            value = json.loads(text) if text[:1] in ("{", "[") else None
        except ValueError:
            value = None
        if not isinstance(value, dict | list):
            return self.text(text)
        redacted = self._walk(value)
        return text if redacted == value else json.dumps(redacted, ensure_ascii=False)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self._walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        return value

    def _replace(self, kind: str, value: str) -> str:
        if not is_pii(kind, value):
            return value
        self.found[kind] += 1
        if self.actions[kind] != "redact":
            return value
        if (kind, value) not in self._assigned:
            self._assigned[kind, value] = self._placeholder(kind, value)
        return self._assigned[kind, value]

    def _placeholder(self, kind: str, value: str) -> str:
        if kind in TAGS:
            return TAGS[kind]
        if self._taken_text is None:
            self._taken_text = self._taken()
        while True:
            number = self._numbers[kind]
            self._numbers[kind] += 1
            if kind == "email":
                candidate = f"user{number + 1}@example.com"
            elif kind == "phone":
                candidate = f"555-01{number % 100:02d}"
            elif ":" in value:
                candidate = f"2001:db8::{number + 1:x}"
            else:
                candidate = f"192.0.2.{number % 254 + 1}"
            if candidate not in self._taken_text or number >= 100:
                return candidate


def redact_text(text: str, kinds: Iterable[str], counts: Counter[str]) -> str:
    """The text with every PII find of the given kinds redacted; `counts` gains one per find."""
    redactor = Redactor(dict.fromkeys(kinds, "redact"), lambda: text)
    text = redactor.text(text)
    counts.update(redactor.found)
    return text
