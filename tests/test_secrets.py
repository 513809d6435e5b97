"""Secrets in training text: one fake but real-looking secret per kind is replaced by <SECRET> and
counted as `secret`; near misses (prose about passwords, placeholders, certificates, ids) are not.

The fakes are assembled at run time so no secret-shaped literal sits in the repository.
"""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from tuneline.cli.data import data_app
from tuneline.curate.clean import run_clean
from tuneline.curate.pii import redact_text
from tuneline.curate.secrets import TOKEN_DETECTORS
from tuneline.recipe import CleanSpec, FileSource
from tuneline.sources.collect import run_collect
from tuneline.store import iter_records, read_manifest, read_stats

ALNUM = "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0u1V2w3X4y5Z6"
PEM_BODY = "MIIEowIBAAKCAQEA" + ALNUM + "\n" + ALNUM[::-1] + "==\n"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0"  # {"sub":"1234567890"}
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

# (kind, text, text after redaction, secrets counted)
SECRETS = [
    ("stripe_live_key", "charge with sk_live_" + ALNUM[:40] + " now", "charge with <SECRET> now", 1),
    ("stripe_restricted_key", "rk_live_" + ALNUM[:30], "<SECRET>", 1),
    (
        "pem_rsa_private_key",
        f"Use this key:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}-----END RSA PRIVATE KEY-----\nthanks",
        "Use this key:\n<SECRET>\nthanks",
        1,
    ),
    (
        "openssh_private_key_without_end",
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}\nnext paragraph",
        "<SECRET>\n\nnext paragraph",
        1,
    ),
    ("aws_access_key_id", "id AKIA" + "Z7Q2X4B9M1K3P5R8 ok", "id <SECRET> ok", 1),
    (
        "aws_secret_access_key_quoted",
        'aws_secret_access_key = "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + 'zK3mQ9v1Lp"',
        'aws_secret_access_key = "<SECRET>"',
        1,
    ),
    (
        "aws_secret_access_key_ini",
        "[default]\naws_secret_access_key=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "zK3mQ9v1Lp",
        "[default]\naws_secret_access_key=<SECRET>",
        1,
    ),
    ("password_assignment", "DB_PASSWORD=Tr0ub4dor&3x", "DB_PASSWORD=<SECRET>", 1),
    ("api_key_yaml", "openai:\n  api_key: 9f8e7d6c5b4a3f2e1d0c", "openai:\n  api_key: <SECRET>", 1),
    ("json_member_line", '{\n  "password": "s3cr3t-Hunter!"\n}', '{\n  "password": "<SECRET>"\n}', 1),
    ("github_classic_token", "token ghp_" + ALNUM[:36], "token <SECRET>", 1),
    ("github_fine_grained_token", "github_pat_" + (ALNUM * 2)[:82], "<SECRET>", 1),
    (
        "slack_bot_token",
        "SLACK=xoxb-" + "123456789012-1234567890123-" + ALNUM[:24],
        "SLACK=<SECRET>",
        1,
    ),
    (
        "slack_webhook",
        "post to https://hooks.slack.com/services/" + "T024BE7LD/B01ABCDEF12/" + ALNUM[:24],
        "post to <SECRET>",
        1,
    ),
    ("google_api_key", "key=AIza" + "SyD-" + ALNUM[:30] + "- next", "key=<SECRET> next", 1),
    ("jwt_with_signature", f"Authorization: Bearer {JWT}", "Authorization: Bearer <SECRET>", 1),
    (
        "credentials_in_url",
        "postgres://admin:" + "S3cretPass@db.internal:5432/app",
        "postgres://admin:<SECRET>@db.internal:5432/app",
        1,
    ),
    ("openai_project_key", "sk-proj-" + ALNUM[:40], "<SECRET>", 1),
    ("huggingface_token", "HF_TOKEN is hf_" + ALNUM[:34], "HF_TOKEN is <SECRET>", 1),
    ("gitlab_token", "glpat-" + ALNUM[:20], "<SECRET>", 1),
    ("sendgrid_key", "SG." + ALNUM[:22] + "." + ALNUM[:43], "<SECRET>", 1),
    (
        "npm_token",
        "//registry.npmjs.org/:_authToken=npm_" + ALNUM[:36],
        "//registry.npmjs.org/:_authToken=<SECRET>",
        1,
    ),
    ("openai_key_with_marker", "sk-" + ALNUM[:20] + "T3BlbkFJ" + ALNUM[20:40], "<SECRET>", 1),
    (
        "azure_storage_key",
        "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=" + (ALNUM * 2)[:86] + "==;",
        "DefaultEndpointsProtocol=https;AccountName=x;<SECRET>;",
        1,
    ),
    ("mailchimp_key", "MAILCHIMP " + "0123456789abcdef0123456789abcdef-us12", "MAILCHIMP <SECRET>", 1),
    ("pypi_token", "pypi-AgEIcHlwaS5vcmc" + (ALNUM * 2)[:72], "<SECRET>", 1),
    ("square_oauth_secret", "sq0csp-" + ALNUM[:43], "<SECRET>", 1),
    ("two_in_one_text", "ghp_" + ALNUM[:36] + " and sk_live_" + ALNUM[:24], "<SECRET> and <SECRET>", 2),
]

# Near misses: text with the words or shapes of a secret that is not one (from the demo data sets
# among others: prose about passwords, a password generator tool's output, sample code).
NOT_SECRETS = [
    ("prose_about_passwords", "1. Use strong and unique passwords: Make sure you use a different one."),
    ("generated_password_in_prose", "Here is your new password: a9B7$#fG3&Z1. Please save it."),
    ("tool_output_json_in_line", '{"password": "aB3#fG7!kL9@"}'),
    ("placeholder_value", ' password="yourpassword",'),
    ("key_name_as_value", "   const apiKey = 'API_KEY';"),
    ("placeholder_same_as_key", "API_KEY=api_key_here"),
    ("indirect_reference", "api_key = os.environ['API_KEY']"),
    ("templated_value", "api_key: ${API_KEY}"),
    ("angle_placeholder", "password: <your password>"),
    ("one_character_class", "password: required"),
    ("short_value", "pwd: ab1"),
    ("certificate", "-----BEGIN CERTIFICATE-----\nMIIB" + ALNUM + "\n-----END CERTIFICATE-----"),
    ("public_key", "-----BEGIN PUBLIC KEY-----\nMIIB" + ALNUM + "\n-----END PUBLIC KEY-----"),
    ("words_with_prefix_letters", "Asia's laws on AWS data: the key is consent, not a secret."),
    ("stripe_test_prefix_too_short", "sk_live_short"),
    ("github_prefix_too_short", "ghp_abc123"),
    ("url_without_credentials", "see https://docs.example.com/guide?page=2#setup"),
    ("not_a_jwt", 'eyJ is how base64 of {" starts; eyJhbGci.not.valid'),
    ("uuid", "request id 550e8400-e29b-41d4-a716-446655440000"),
    ("commit_sha", "fixed in 3f786850e387550fdab836ed7e6dc881de23001b"),
]


@pytest.mark.parametrize(("kind", "text", "redacted", "count"), SECRETS, ids=[c[0] for c in SECRETS])
def test_each_kind_of_secret_is_replaced_and_counted(kind, text, redacted, count):
    counts = Counter()
    assert redact_text(text, ["secret"], counts) == redacted
    assert counts == Counter(secret=count)


@pytest.mark.parametrize(("case", "text"), NOT_SECRETS, ids=[c[0] for c in NOT_SECRETS])
def test_near_misses_are_left_alone(case, text):
    counts = Counter()
    assert redact_text(text, ["secret", "email", "phone", "ip", "card"], counts) == text
    assert counts == Counter()


def test_secrets_are_left_when_the_recipe_turns_the_kind_off():
    text = "token ghp_" + ALNUM[:36]
    counts = Counter()
    assert redact_text(text, ["email"], counts) == text and counts == Counter()


def test_every_token_detector_has_a_case():
    """A detector added to the list gets a fake secret here, which also checks its prefixes."""
    covered = set()
    for _, text, _, _ in SECRETS:
        for detector, hints in TOKEN_DETECTORS:
            if any(hint in text for hint in hints) and any(detector.analyze_string(text)):
                covered.add(type(detector).__name__)
    assert covered == {type(detector).__name__ for detector, _ in TOKEN_DETECTORS}


def test_clean_keeps_no_secret_and_data_check_counts_them(tmp_path):
    path = tmp_path / "leaky.jsonl"
    rows = [
        {"instruction": f"How do I configure service number {i}?", "output": f"Set it up so:\n{text}"}
        for i, (_, text, _, _) in enumerate(SECRETS)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    collected = run_collect(tmp_path / "store", [FileSource(name="leaky", path=str(path))])
    cleaned = run_clean(tmp_path / "store", collected, CleanSpec())
    total = sum(case[3] for case in SECRETS)
    assert read_stats(cleaned)["pii_redacted"]["secret"] == total
    assert read_manifest(cleaned)["ledger"]["out"] == len(rows)  # redacted, not dropped
    kept = json.dumps(list(iter_records(cleaned)))
    for secret in ("sk_live_", "PRIVATE KEY", "AKIA", "wJalrXUtnFEMI", "Tr0ub4dor", "ghp_", "github_pat_",
                   "xoxb-", "hooks.slack.com", "AIza", JWT[:20], "S3cretPass", "hf_", "glpat-"):  # fmt: skip
        assert secret not in kept
    result = CliRunner().invoke(data_app, ["check", str(path)])
    assert f"secret: {total}" in result.output, result.output
