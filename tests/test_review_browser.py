"""A paused augmentation round resumed through the Prefect UI's form, in headless Chromium.

The test harness's server does not serve the UI (it runs with PREFECT_UI_ENABLED=0), so this
test starts a real `prefect server start` on a free loopback port, with PREFECT_UI_API_URL
pointing the UI at it. Chromium is Debian's (/usr/bin/chromium, installed by .ci/run), driven
by playwright with the flags a closed network needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai_server import openai_server
from test_review_flow import TOPICS, flow_result, start_flow, teacher_script, wait_for_pause, write_recipe

from flows.server import free_port, wait_healthy
from tuneline.review import finished_decisions, list_pending

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture
def prefect_ui(tmp_path):
    """A Prefect server that serves the UI, on a free loopback port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path / "prefect-ui-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{url}/api",
    }
    env.pop("PREFECT_API_URL", None)
    log_path = tmp_path / "prefect-ui.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_healthy(f"{url}/api", process, 120, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def choose(page, select, option: str) -> None:
    """Pick an option of the UI's custom select: open it (keyboard, else a synthetic click), click."""
    options = page.locator("[role=option]").filter(has_text=option)
    for opener in ("ArrowDown", "click", "ArrowDown", "click"):
        if opener == "click":
            select.dispatch_event("click")
        else:
            select.focus()
            select.press(opener)
        page.wait_for_timeout(500)
        if options.count() and options.first.is_visible():
            options.first.click()
            return
    raise AssertionError(f"the select did not open to offer {option!r}")


def test_a_paused_round_is_decided_in_the_prefect_ui_form(prefect_ui, tmp_path):
    from playwright.sync_api import sync_playwright
    from prefect.settings import PREFECT_API_URL, temporary_settings

    artifacts = tmp_path / "artifacts"
    with (
        temporary_settings({PREFECT_API_URL: f"{prefect_ui}/api"}),
        openai_server(teacher_script) as server,
    ):
        recipe = write_recipe(tmp_path, server.base_url, max_rounds=1, how="prefect")
        log = tmp_path / "flow.log"
        process = start_flow(recipe, log)
        try:
            pending = wait_for_pause(artifacts, process, log)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{prefect_ui}/runs/flow-run/{pending.run_id}", wait_until="networkidle")
                page.get_by_role("button", name="Resume").click()
                form = page.get_by_role("dialog")
                form.wait_for()
                fields = form.locator("textarea")  # reviewer, then per row: id, question, answer, reason
                assert fields.count() == 1 + 4 * pending.count
                assert fields.nth(3).input_value() in {answer for _, answer in TOPICS}  # pre-filled
                fields.nth(0).fill("ui-reviewer")
                decision = form.locator("button.p-select-button__control").nth(1)
                choose(page, decision, "reject")
                assert decision.inner_text() == "reject"
                fields.nth(1 + 4 * 1 + 3).fill("sells a product the shop does not stock")
                fields.nth(1 + 4 * 2 + 2).fill("Yes: three wide cargo-bike stands wait by the side door.")
                form.get_by_role("button", name="Submit").click()
                result = flow_result(process, log)
                browser.close()
        finally:
            process.kill()

    decisions = finished_decisions(artifacts, pending.batch)
    assert [(d["decision"], d["reviewer"]) for d in decisions] == [
        ("accept", "ui-reviewer"),
        ("reject", "ui-reviewer"),
        ("edit", "ui-reviewer"),
        ("accept", "ui-reviewer"),
    ]
    assert decisions[1]["reason"] == "sells a product the shop does not stock"
    assert (
        decisions[2]["messages"][-1]["content"] == "Yes: three wide cargo-bike stands wait by the side door."
    )
    assert list_pending(artifacts) == []
    merged = (Path(result["augment"]) / "records.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["meta"].get("origin") == "edited" for line in merged) == 1
