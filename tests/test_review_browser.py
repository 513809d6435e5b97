"""A paused augmentation round resumed through the Prefect UI's form, in headless Chromium.

The test harness's server does not serve the UI (it runs with PREFECT_UI_ENABLED=0), so this
test uses the server `tuneline run` starts: `prefect server start` on a free loopback port, with
PREFECT_UI_API_URL pointing the UI at that port. Chromium is Debian's (/usr/bin/chromium,
installed by .ci/run), driven by playwright with the flags a closed network needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import openai_server
from test_review_flow import TOPICS, flow_result, start_flow, teacher_script, wait_for_pause, write_recipe
from tuneline.flows.server import local_prefect_server

from tuneline.augment.review import finished_decisions, list_pending

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
def prefect_ui(tmp_path, monkeypatch):
    """The server `tuneline run` starts (it serves the UI, pointed at its own port); yields its base URL."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with local_prefect_server(tmp_path / "prefect-ui-home", timeout=120) as api_url:
        yield api_url.removesuffix("/api")


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
    from playwright.sync_api import expect, sync_playwright
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
                # The dialog opens before its form renders (seen under load): wait for the fields.
                expect(fields).to_have_count(1 + 4 * pending.count, timeout=30_000)
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
