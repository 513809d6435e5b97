"""The augmentation loop's review checkpoint in real runs: the augment flow runs in its own process
against the session's Prefect server and the loopback teacher; the test is the other process that
reviews. Round 1 is decided through the Prefect API (resume_flow_run with run_input), round 2 by
`tuneline review export/import`; a kill during a review loses no candidate and no decision; a
review nobody does fails the run with a message naming the batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from openai_server import openai_server

from tuneline.augment.review import (
    PendingBatch,
    finish_batch,
    finished_decisions,
    list_pending,
    make_decision,
    read_decisions,
    record_decision,
    to_form_input,
)

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer the customer's question about the Tuneline bike shop in one or two sentences."
SEEDS = [
    ("Do you repair electric bikes?", "Yes, our workshop services e-bikes from all major brands."),
    ("How long does a tune-up take?", "A standard tune-up takes about two working days."),
    ("Can I rent a bike for a weekend?", "Yes, weekend rentals run from Friday noon to Monday noon."),
]
# What the teacher writes: distinct questions, so the similarity check keeps them all.
TOPICS = [
    (
        "Which tyre pressure suits a gravel bike on wet trails?",
        "Around 30 to 35 psi grips well on wet gravel.",
    ),
    ("Do you sell child seats that fit on the rear rack?", "Yes, we stock two rack-mounted child seats."),
    ("Is there parking for cargo bikes outside the shop?", "There are three wide stands by the side door."),
    ("Can you fit mudguards to a carbon road frame?", "Yes, with clip-on guards that need no eyelets."),
    ("What warranty comes with a used bike from you?", "Every used bike has a six-month workshop warranty."),
    ("Do you offer bike fitting for long-distance riders?", "A full fit session takes ninety minutes."),
    ("How do I book a slot for a puncture repair?", "Book online or walk in; punctures are fixed same day."),
    ("Are gift vouchers valid for workshop services?", "Vouchers cover both products and workshop labour."),
    ("Which locks do insurers accept for e-bikes?", "Most insurers want a Sold Secure Gold rated lock."),
    ("Do you recycle old inner tubes and tyres?", "Drop them at the counter; we send them to a recycler."),
    ("Can I trade in my old bike against a new one?", "Yes, we value trade-ins in the shop on the spot."),
    (
        "Do you stock spare batteries for Bosch motors?",
        "We keep the 500 and 625 Wh Bosch batteries in stock.",
    ),
]


def teacher_script(request: Any) -> str:
    """Two candidates per request, the n-th request taking topics 2n and 2n+1."""
    first = (2 * request.index) % len(TOPICS)
    pairs = [TOPICS[first], TOPICS[(first + 1) % len(TOPICS)]]
    return json.dumps({"candidates": [{"instruction": q, "input": "", "output": a} for q, a in pairs]})


def write_recipe(tmp_path: Path, base_url: str, max_rounds: int = 2, **review: Any) -> Path:
    """A recipe with one seed file and an augment section: 4 candidates a round, 2 per request."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"system": SYSTEM, "instruction": q, "input": "", "output": a}) + "\n"
            for q, a in SEEDS
        )
    )
    recipe = {
        "name": "review-test",
        "artifacts_dir": str(tmp_path / "artifacts"),
        "sources": [{"name": "seeds", "path": str(seeds)}],
        "model": {"name": "unused-in-augment"},
        "register": {"model_name": "review-test", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "augment": {
            "teacher": {
                "base_url": base_url,
                "model": "teacher-1",
                "mode": "record",
                "recordings": str(tmp_path / "recordings"),
                "max_retries": 0,
            },
            "review": {"timeout_s": 120, **review},
            "per_round": 4,
            "per_request": 2,
            "examples_per_request": 2,
            "max_rounds": max_rounds,
            "target_accepted": 100,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


RUN_FLOW = (
    "import json, sys\n"
    "from tuneline.flows.augment import augment\n"
    "from tuneline.recipe import load_recipe\n"
    "print('RESULT ' + json.dumps(augment(load_recipe(sys.argv[1], sys.argv[2:]))), flush=True)\n"
)


def start_flow(recipe: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """The augment flow in its own process, against the test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", RUN_FLOW, str(recipe), *overrides],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )


def wait_for_pause(
    artifacts: Path, process: subprocess.Popen, log: Path, seen: set[str] = frozenset()
) -> PendingBatch:
    """The next pending batch, once its flow run is paused in Prefect (resumable)."""
    from prefect import get_client

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the flow exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        fresh = [b for b in list_pending(artifacts) if b.batch not in seen]
        if fresh:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(fresh[0].run_id)).state
            if state and state.is_paused():
                return fresh[0]
        time.sleep(0.5)
    raise AssertionError(f"no paused review within 90 s:\n{log.read_text()[-3000:]}")


def flow_result(process: subprocess.Popen, log: Path, timeout: float = 90) -> dict:
    """Wait for the flow process; its returned dict (the run must succeed)."""
    process.wait(timeout=timeout)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return json.loads(text.split("RESULT ", 1)[1].splitlines()[0])


@pytest.mark.slow
def test_flow_pauses_and_another_process_decides_through_the_prefect_api(prefect_server, tmp_path):
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run

    artifacts = tmp_path / "artifacts"
    with openai_server(teacher_script) as server:
        recipe = write_recipe(tmp_path, server.base_url, how="prefect", reviewer="qa-lead")
        log = tmp_path / "flow.log"
        process = start_flow(recipe, log)
        try:
            first = wait_for_pause(artifacts, process, log)
            assert first.round == 1 and first.count == 4 and first.how == "prefect"
            candidates = [json.loads(line) for line in Path(first.candidates_path).read_text().splitlines()]

            # a reject without a reason is refused: the good rows are kept and the run pauses again
            form = to_form_input(candidates, {}, "qa-lead")
            form["rows"][0].update(decision="reject", reason="")
            resume_flow_run(UUID(first.run_id), run_input=form)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(UUID(first.run_id)).state
                if state.is_paused() and len(read_decisions(artifacts, first.batch)) == 3:
                    break
                time.sleep(0.5)
            assert set(read_decisions(artifacts, first.batch)) == {c["id"] for c in candidates[1:]}
            assert finished_decisions(artifacts, first.batch) is None

            form["rows"][0]["reason"] = "answers with store hours nobody asked for"
            form["rows"][1].update(decision="reject", reason="invents a product we do not sell")
            form["rows"][2]["answer"] = "Yes: three wide cargo-bike stands are by the side door."
            resume_flow_run(UUID(first.run_id), run_input=form)

            # round 2 is reviewed through a file, and the CLI resumes the run
            second = wait_for_pause(artifacts, process, log, seen={first.batch})
            assert second.round == 2 and second.run_id == first.run_id
            exported = tmp_path / "round2.csv"
            cli = [sys.executable, "-m", "tuneline.cli.main", "review"]
            env = {**os.environ, "PREFECT_API_URL": "", "TUNELINE_REVIEWER": "bob"}
            subprocess.run([*cli, "export", second.run_name, "--to", str(exported), "--artifacts-dir",
                            str(artifacts)], check=True, cwd=REPO, env=env, capture_output=True)  # fmt: skip
            with open(exported, newline="") as handle:
                rows = list(csv.DictReader(handle))
            for row in rows:
                row["decision"] = "accept"
            with open(exported, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            done = subprocess.run([*cli, "import", str(exported), "--artifacts-dir", str(artifacts)],
                                  cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"run {second.run_name} resumed" in done.stdout

            result = flow_result(process, log)
        finally:
            process.kill()
        round_two_prompts = [r.user_text for r in server.requests[2:]]

    decided = finished_decisions(artifacts, first.batch)
    assert [(d["decision"], d["reviewer"]) for d in decided] == [
        ("reject", "qa-lead"), ("reject", "qa-lead"), ("edit", "qa-lead"), ("accept", "qa-lead"),
    ]  # fmt: skip
    assert {d["reviewer"] for d in finished_decisions(artifacts, second.batch)} == {"bob"}
    assert list_pending(artifacts) == []
    # the round-2 prompt carries round 1's reject reasons, stored and as sent to the teacher
    assert len(round_two_prompts) == 2
    for text in round_two_prompts:
        assert "answers with store hours nobody asked for" in text
        assert "invents a product we do not sell" in text
    assert [row["accepted"] + row["edited"] for row in result["rounds"]] == [2, 4]

    merged = [
        json.loads(line) for line in (Path(result["augment"]) / "records.jsonl").read_text().splitlines()
    ]
    generated = [r for r in merged if r["meta"].get("origin") in ("generated", "edited")]
    assert len(merged) == len(SEEDS) + 6 and len(generated) == 6
    edited = next(r for r in generated if r["meta"]["origin"] == "edited")
    assert edited["messages"][-1]["content"] == "Yes: three wide cargo-bike stands are by the side door."
    assert edited["meta"]["review"]["reviewer"] == "qa-lead"

    # one MLflow run for the augmentation, each round a step of its token and decision metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_name.startswith("augment-") for run in runs] == [True]
    history = client.get_metric_history(runs[0].info.run_id, "completion_tokens")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "accepted")] == [1, 4]


@pytest.mark.slow
def test_killing_the_run_during_review_loses_no_candidate_and_no_decision(prefect_server, tmp_path):
    artifacts = tmp_path / "artifacts"
    with openai_server(teacher_script) as server:
        recipe = write_recipe(tmp_path, server.base_url, max_rounds=1, how="terminal")
        log = tmp_path / "flow.log"
        process = start_flow(recipe, log)
        try:
            pending = wait_for_pause(artifacts, process, log)
            candidates = [json.loads(line) for line in Path(pending.candidates_path).read_text().splitlines()]
            # a reviewer decides two candidates (each journaled at once), then the run is killed
            record_decision(artifacts, pending.batch, make_decision(candidates[0], "accept", "ann"))
            record_decision(
                artifacts, pending.batch, make_decision(candidates[1], "reject", "ann", reason="too chatty")
            )
        finally:
            process.kill()
            process.wait()
        asked = server.count

        assert [
            json.loads(line)["id"] for line in Path(pending.candidates_path).read_text().splitlines()
        ] == [c["id"] for c in candidates]
        assert set(read_decisions(artifacts, pending.batch)) == {candidates[0]["id"], candidates[1]["id"]}
        assert [b.batch for b in list_pending(artifacts)] == [pending.batch]

        # the rest decided offline (the killed run cannot be resumed); the re-run never asks again
        finish_batch(
            artifacts, pending.batch, candidates, [make_decision(c, "accept", "ann") for c in candidates[2:]]
        )
        log = tmp_path / "rerun.log"
        result = flow_result(start_flow(recipe, log), log)
        assert server.count == asked  # the round came from its stage: the teacher was not asked again
    assert list_pending(artifacts) == []
    assert result["rounds"][0]["accepted"] == 3 and result["rounds"][0]["rejected_in_review"] == 1
    assert "Pausing flow" not in log.read_text()


@pytest.mark.slow
def test_a_review_nobody_does_fails_the_run_naming_the_batch_and_keeps_the_candidates(
    prefect_server, tmp_path
):
    from tuneline.flows.augment import augment  # in this process: the run pauses, nobody resumes it

    from tuneline.augment.review import ReviewTimeout
    from tuneline.recipe import load_recipe

    artifacts = tmp_path / "artifacts"
    with openai_server(teacher_script) as server:
        recipe = load_recipe(write_recipe(tmp_path, server.base_url, max_rounds=1, how="file", timeout_s=2))
        with pytest.raises(ReviewTimeout) as failure:
            augment(recipe)
    text = str(failure.value)
    (pending,) = list_pending(artifacts)
    assert f"nobody reviewed batch {pending.batch} within review.timeout_s=2" in text
    assert f"tuneline review decide {pending.run_name}" in text
    assert f"tuneline review export {pending.run_name}" in text
    assert len(Path(pending.candidates_path).read_text().splitlines()) == 4
