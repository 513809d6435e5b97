"""Secrets in text (API keys, tokens, private keys, passwords in config lines) found with detect-secrets.

The rules are Yelp's detect-secrets plugins (a maintained rule set), not a list of our own. Each
detector runs only on the lines that hold one of its literal prefixes: running all detectors on a
line costs ~0.7 ms, while one Aho-Corasick pass (ahocorasick-rs, Rust's aho-corasick crate) finds
every prefix of every detector in a text in about the time `str.lower` takes (pyahocorasick took
3-4 times as long), and most text holds none. Prefixes are
matched case-sensitively, as most detectors match; where a detector ignores case, its prefixes
are listed as lower, Title and UPPER case (`apiKey`, `DB_PASSWORD`, `Password:`).

What counts as a secret, and what is left alone on purpose:

- token detectors (AWS, Stripe, GitHub, GitLab, Slack, OpenAI, JWT, SendGrid, PyPI, npm, Square,
  Azure storage, Mailchimp, credentials in URLs) fire on the token's shape wherever it stands;
- a PEM/OpenSSH/PGP private key is redacted as a whole block, BEGIN to END;
- detect-secrets' KeywordDetector (`password=...`, `api_key: ...`) fires on prose and on sample
  code, so it runs in its config-file mode only on lines that *are* an assignment (the line starts
  with the key), and keeps a value only if it is one token of 6+ characters mixing two character
  classes that is not a placeholder (`<...>`, `${...}`, `your_password`, a function call);
- detect-secrets' high-entropy detectors are not used: they fire on every other word of prose.

A found value is replaced with its whole token (detect-secrets matches the first 24 characters of
a Stripe key and a JWT without its signature) by the caller's placeholder.
"""

from __future__ import annotations

import re
from collections import defaultdict

import ahocorasick_rs
from detect_secrets.filters.heuristic import (
    is_indirect_reference,
    is_likely_id_string,
    is_potential_uuid,
    is_prefixed_with_dollar_sign,
    is_sequential_string,
    is_templated_secret,
)
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import BasePlugin
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, DENYLIST, KeywordDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector

GITLAB_PREFIXES = (
    "glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941",
    "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-",
)  # fmt: skip


def any_case(*words: str) -> tuple[str, ...]:
    """The words as written in lower, Title and UPPER case (for detectors that ignore case)."""
    return tuple({form for word in words for form in (word.lower(), word.title(), word.upper())})


# Each token detector with the literals one of which every match holds. test_secrets.py finds a
# fake secret of every kind, so a stale prefix shows there.
TOKEN_DETECTORS: tuple[tuple[BasePlugin, tuple[str, ...]], ...] = (
    (AWSKeyDetector(), ("AKIA", "ASIA", "ABIA", "ACCA", "A3T", *any_case("aws"))),
    (AzureStorageKeyDetector(), ("AccountKey=",)),
    (BasicAuthDetector(), ("://",)),
    (GitHubTokenDetector(), ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    (GitLabTokenDetector(), GITLAB_PREFIXES),
    (JwtTokenDetector(), ("eyJ",)),
    (MailchimpDetector(), ("-us",)),
    (NpmDetector(), ("_authToken",)),
    (OpenAIDetector(), ("T3BlbkFJ",)),
    (PypiTokenDetector(), ("pypi-AgE",)),
    (SendGridDetector(), ("SG.",)),
    (SlackDetector(), (*any_case("xox"), "hooks.slack.com")),
    (SquareOAuthDetector(), ("sq0csp-",)),
    (StripeDetector(), ("k_live_",)),
)
PRIVATE_KEY_HINTS = ("PRIVATE KEY", "PuTTY-User-Key-File")
# A private key block (looked for with two substring checks, not the automaton): from the BEGIN
# line detect-secrets knows to the END line, or else to the first blank line (a truncated key).
# Bounded so a missing END cannot make the scan quadratic.
PRIVATE_KEY_BEGIN = "|".join(pattern.pattern for pattern in PrivateKeyDetector.denylist)
PRIVATE_KEY_BLOCK = re.compile(
    rf"(?:-----)?(?:{PRIVATE_KEY_BEGIN})[\s\S]{{0,20000}}?"
    r"(?:-----END[ A-Z0-9]{0,40}-----|(?=\n[ \t]*\n)|\Z)"
)

KEYWORD = KeywordDetector()
KEYWORD_DETECTOR = len(TOKEN_DETECTORS)  # its index in the automaton
KEYWORD_HINTS = any_case("key", "pass", "pwd", "secret", "contrase")
# A line that is an assignment of a secret-sounding key (YAML, .env, ini, a JSON member on its own
# line): the key starts the line. `{"password": ...}` inside a line and prose are not config lines.
CONFIG_LINE = re.compile(
    rf"\s*(?:export\s+)?[\"']?[\w.-]{{0,40}}?(?:{'|'.join(DENYLIST)})[\w.-]{{0,40}}[\"']?\s*[:=]",
    re.IGNORECASE,
)
PLACEHOLDER_WORDS = ("your", "example", "changeme", "placeholder", "dummy", "xxx", "***", "...")
CHARACTER_CLASSES = (str.islower, str.isupper, str.isdigit, lambda char: not char.isalnum())
# Characters a token goes on with after the part a detector matched.
TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-+/=]*")


def build_automaton() -> tuple[ahocorasick_rs.AhoCorasick, list[int]]:
    """One automaton for every detector's prefixes, and the detector index of each prefix."""
    groups = [hints for _, hints in TOKEN_DETECTORS] + [KEYWORD_HINTS]
    detector_of = [index for index, hints in enumerate(groups) for _ in hints]
    return ahocorasick_rs.AhoCorasick([hint for hints in groups for hint in hints]), detector_of


AUTOMATON, DETECTOR_OF_HINT = build_automaton()


def keyword_value_is_secret(value: str, line: str) -> bool:
    """A config line's value that looks like a real credential, not a placeholder or a reference."""
    lowered = value.lower()
    if len(value) < 6 or any(char.isspace() for char in value):
        return False
    if any(word in lowered for word in PLACEHOLDER_WORDS) or any(
        re.fullmatch(f"[\\w-]*?(?:{keyword})[\\w-]*", lowered) for keyword in DENYLIST
    ):
        return False  # `password: your_password`, `api_key=API_KEY`
    if sum(any(test(char) for char in value) for test in CHARACTER_CLASSES) < 2:
        return False  # `password: required`, `pwd: 123456`
    return not (
        is_templated_secret(value)
        or is_prefixed_with_dollar_sign(value)
        or is_indirect_reference(line)
        or is_sequential_string(value)
        or is_potential_uuid(value)
        or is_likely_id_string(value, line, KEYWORD)
    )


def line_secrets(line: str, detectors: set[int]) -> set[str]:
    """The secret values the given detectors (indexes, as the automaton gives them) find in a line."""
    values: set[str] = set()
    for index in detectors:
        if index < len(TOKEN_DETECTORS):
            values.update(TOKEN_DETECTORS[index][0].analyze_string(line))
    if KEYWORD_DETECTOR in detectors and CONFIG_LINE.match(line):
        values.update(
            value
            for value in KEYWORD.analyze_string(line, CONFIG_DENYLIST_REGEX_TO_GROUP)
            if keyword_value_is_secret(value, line)
        )
    return {value for value in values if value}


def redact_line(line: str, values: set[str], placeholder: str) -> tuple[str, int]:
    """The line with every occurrence of the values, and the rest of their token, replaced."""
    spans = []
    for value in values:
        start = line.find(value)
        while start >= 0:
            end = TOKEN_TAIL.match(line, start + len(value)).end()
            spans.append((start, end))
            start = line.find(value, start + 1)
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in reversed(merged):
        line = line[:start] + placeholder + line[end:]
    return line, len(merged)


def redact_secrets(text: str, placeholder: str) -> tuple[str, int]:
    """The text with every secret found replaced by the placeholder, and how many were replaced."""
    count = 0
    if any(hint in text for hint in PRIVATE_KEY_HINTS):
        text, count = PRIVATE_KEY_BLOCK.subn(placeholder, text)
    detectors_by_line: defaultdict[int, set[int]] = defaultdict(set)  # line start -> detectors
    # Overlapping: `AccountKey=` holds the keyword prefix `Key`; both must be seen.
    for hint, start, _ in AUTOMATON.find_matches_as_indexes(text, overlapping=True):
        detectors_by_line[text.rfind("\n", 0, start) + 1].add(DETECTOR_OF_HINT[hint])
    for start in sorted(detectors_by_line, reverse=True):  # from the end: earlier offsets stay valid
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if values := line_secrets(line, detectors_by_line[start]):
            line, replaced = redact_line(line, values, placeholder)
            text = text[:start] + line + text[end:]
            count += replaced
    return text, count
