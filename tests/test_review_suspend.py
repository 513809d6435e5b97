"""In a deployment, a review SUSPENDS the run: its worker and flow process exit while it waits, and
the run is re-executed when the decisions arrive through the Prefect API. The re-execution finds
the round's candidates in their stage (the teacher is not asked again) and stores the decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from openai_server import openai_server
from test_review_flow import teacher_script, write_recipe

from tuneline.augment.review import finished_decisions, list_pending, to_form_input
from tuneline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def deploy_augment(pool: str) -> UUID:
    """A process work pool and a deployment of the augment flow from this checkout; its id."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker
    from tuneline.flows.augment import augment

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
            )
        )
    flow = augment.from_source(source=str(REPO), entrypoint="flows/augment.py:augment")
    return flow.deploy(name="suspend-test", work_pool_name=pool, print_next_steps=False)


def run_worker_once(pool: str, log: Path, timeout: float = 90) -> None:
    """One `prefect worker start --run-once`: it runs the scheduled run and exits when the run's
    process has exited (finished, failed or suspended)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"]
    with open(log, "a") as out:
        done = subprocess.run(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def flow_run_state(run_id: UUID):  # noqa: ANN201 - a Prefect State
    """The flow run's current state, read from the server."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


@pytest.mark.slow
def test_a_deployment_run_suspends_for_review_and_resumes_with_the_decisions(prefect_server, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    artifacts = tmp_path / "artifacts"
    pool = f"review-suspend-{uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with openai_server(teacher_script) as server:
        recipe = write_recipe(tmp_path, server.base_url, max_rounds=1, how="prefect", reviewer="qa-lead")
        deployment_id = deploy_augment(pool)
        run = run_deployment(
            deployment_id, parameters={"recipe": load_recipe(recipe).model_dump(mode="json")}, timeout=0
        )

        # the worker exits once the run suspends: nothing holds the run while it waits for review
        run_worker_once(pool, log)
        state = flow_run_state(run.id)
        assert state.is_paused() and state.name == "Suspended", (state, log.read_text()[-3000:])
        (pending,) = list_pending(artifacts)
        assert pending.run_id == str(run.id) and pending.count == 4
        asked = server.count
        assert asked == 2

        candidates = [json.loads(line) for line in Path(pending.candidates_path).read_text().splitlines()]
        form = to_form_input(candidates, {}, "qa-lead")
        form["rows"][0].update(decision="reject", reason="answers a question nobody asked")
        form["rows"][1]["answer"] = "We stock two child seats that fit on the rear rack."
        resume_flow_run(run.id, run_input=form)

        # a fresh worker re-executes the run from the start; it gets the submitted form and finishes
        run_worker_once(pool, log)
        state = flow_run_state(run.id)
        assert state.is_completed(), (state, log.read_text()[-3000:])
        assert server.count == asked  # the round came from its stage: the teacher was not asked again

    decided = finished_decisions(artifacts, pending.batch)
    assert [(d["decision"], d["reviewer"]) for d in decided] == [
        ("reject", "qa-lead"), ("edit", "qa-lead"), ("accept", "qa-lead"), ("accept", "qa-lead"),
    ]  # fmt: skip
    assert decided[0]["reason"] == "answers a question nobody asked"
    assert list_pending(artifacts) == []
