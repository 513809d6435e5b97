"""`tuneline review list|decide` driven through a pseudo-terminal, as a person at a keyboard would use it."""

from __future__ import annotations

import os
import re
import shutil
import sys

import pexpect
import pytest
from review_fixtures import open_pending_batch

from tuneline.augment.review import finished_decisions, list_pending

TUNELINE = shutil.which("tuneline") or f"{sys.executable} -m tuneline.cli.main"


@pytest.fixture
def pending(tmp_path):
    """A batch of three candidates waiting for review (a run that is not a Prefect run: no resume)."""
    candidates = [
        {
            "id": f"c{n}",
            "messages": [
                {"role": "user", "content": f"How do I reset password number {n}?"},
                {"role": "assistant", "content": f"Open settings and choose reset ({n})."},
            ],
            "meta": {"origin": "generated", "round": 1},
        }
        for n in (1, 2, 3)
    ]
    artifacts, batch = open_pending_batch(
        tmp_path, candidates, run_id="local", run_name="quiet-heron", how="terminal"
    )
    return artifacts, batch


def spawn(artifacts, *args: str) -> pexpect.spawn:
    env = {**os.environ, "TUNELINE_REVIEWER": "ann", "COLUMNS": "200"}
    command = f"{TUNELINE} review {' '.join(args)} --artifacts-dir {artifacts}"
    return pexpect.spawn(command, env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))


def test_terminal_review_keeps_progress_after_quit_and_finishes_later(pending):
    artifacts, batch = pending
    child = spawn(artifacts, "decide", "quiet-heron")
    child.expect("round 1 of quiet-heron: 3 of 3 to go")
    child.expect(r"How do I reset password number 1\?")
    child.expect(r"\[q\]uit")
    child.send("a")
    child.expect("accepted")
    child.expect(r"\[q\]uit")
    child.send("r")
    child.expect("reason")
    child.sendline("")  # an empty reason is refused, the candidate asked again
    child.expect("a reject needs a reason")
    child.send("r")
    child.expect("reason")
    child.sendline("too vague: which account?")
    child.expect("rejected")
    child.expect(r"\[q\]uit")
    child.send("q")
    child.expect(r"2 decisions kept\. `tuneline review decide quiet-heron` goes on")
    child.expect(pexpect.EOF)
    assert [b.batch for b in list_pending(artifacts)] == [batch.batch]

    child = spawn(artifacts, "decide")  # no run given: the oldest pending batch
    child.expect("1 of 3 to go")
    child.expect(r"password number 3\?")
    child.expect(r"\[q\]uit")
    child.send("e")
    child.expect("new answer")
    child.sendline("Open Settings > Security and press Reset password.")
    child.sendline("It sends a link to your e-mail.")
    child.sendline(".")
    child.expect("edited")
    child.expect("all 3 candidates decided")
    child.expect("not a Prefect run")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    decisions = finished_decisions(artifacts, batch.batch)
    assert [(d["id"], d["decision"], d["reviewer"]) for d in decisions] == [
        ("c1", "accept", "ann"),
        ("c2", "reject", "ann"),
        ("c3", "edit", "ann"),
    ]
    assert decisions[1]["reason"] == "too vague: which account?"
    assert decisions[2]["messages"][-1]["content"] == (
        "Open Settings > Security and press Reset password.\nIt sends a link to your e-mail."
    )
    assert list_pending(artifacts) == []


def test_list_shows_what_waits_and_how_to_decide_it(pending):
    artifacts, batch = pending
    child = spawn(artifacts, "list")
    child.expect(
        rf"run quiet-heron \(local\) round 1: 3 candidates, batch {batch.batch}, review\.how terminal"
    )
    child.expect(r"`tuneline review decide RUN`")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [b.batch for b in list_pending(artifacts)] == [batch.batch]  # listing decides nothing


@pytest.mark.parametrize("verb", ["list", "decide"])
def test_nothing_pending_is_said_and_is_no_error(tmp_path, verb):
    child = spawn(tmp_path, verb)
    child.expect("nothing waits for review")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_review_without_a_sub_command_shows_the_sub_commands():
    env = {**os.environ, "COLUMNS": "200"}
    child = pexpect.spawn(f"{TUNELINE} review", env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))
    text = re.sub(r"\x1b\[[0-9;]*m", "", child.read())  # without the colours
    assert "Usage: tuneline review" in text
    for verb in ("list", "decide", "export", "import"):  # each with its one-line help beside it
        assert re.search(rf"\b{verb} {{2,}}[A-Z]", text), text
