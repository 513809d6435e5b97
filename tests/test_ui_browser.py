"""What a person opens after `tuneline run`, in headless Chromium: the run page, the train task's
log moving step by step, and the quality gate's Data Docs, all from the project's server on the
port it got (not Prefect's default 4200), with no request that fails or leaves the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from test_flow import project, recipe_for  # noqa: F401  (the tiny project fixture)
from test_review_browser import CHROMIUM, FLAGS
from tuneline.flows.server import SERVER_FILE, stop_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


def api(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def finished_run(project, tmp_path):  # noqa: F811
    """A `tuneline run` whose project server stays up afterwards, as it does for a user."""
    recipe = recipe_for(project, train={"logging_steps": 2})
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["artifacts_dir"] = str(tmp_path / "store")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["TUNELINE_SERVER_IDLE_S"] = "300"
    home = tmp_path / "store" / "prefect"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tuneline.cli.main", "run", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield json.loads((home / SERVER_FILE).read_text())["url"], tmp_path
    finally:
        stop_server(home)


def test_the_run_page_the_training_log_and_the_data_docs_open_on_the_servers_port(finished_run):
    from playwright.sync_api import sync_playwright

    api_url, folder = finished_run
    base = api_url.removesuffix("/api")
    assert not base.endswith(":4200")
    (flow_run,) = api(f"{api_url}/flow_runs/filter", {})
    task_runs = api(f"{api_url}/task_runs/filter", {"task_runs": {"name": {"like_": "train"}}})
    train_run = next(run for run in task_runs if run["name"].startswith("train"))
    (docs,) = api(f"{api_url}/artifacts/filter", {"artifacts": {"key": {"any_": ["data-docs"]}}})
    docs_url = docs["data"].split("](")[1].rstrip(")")  # a link artifact's data is markdown
    assert docs_url.startswith(f"{base}/tuneline/data-docs/"), docs_url

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        failed: list[str] = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.on("response", lambda response: response.status >= 400 and failed.append(response.url))

        page.goto(f"{base}/runs/flow-run/{flow_run['id']}", wait_until="networkidle")
        page.get_by_text(flow_run["name"]).first.wait_for()
        assert "Can't connect" not in page.content()
        page.screenshot(path=folder / "run-page.png")

        page.goto(f"{base}/runs/task-run/{train_run['id']}", wait_until="networkidle")
        page.get_by_text("training step 2/12").first.wait_for(timeout=30_000)
        assert "Can't connect" not in page.content()
        page.screenshot(path=folder / "train-log.png")

        page.goto(docs_url, wait_until="networkidle")
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.get_by_text("Expectation Suites").first.wait_for()
        results = page.locator("table.ge-index-page-validation-results-table tbody tr")
        assert results.count() == 1 and "conversations" in results.first.inner_text()  # filled by its script
        assert errors == []
        font = page.evaluate("getComputedStyle(document.body).fontFamily")
        assert "system-ui" in font or "apple-system" in font, font  # Bootstrap's stylesheet applies
        page.screenshot(path=folder / "data-docs.png", full_page=True)
        browser.close()
    # Prefect's UI asks for an icon it does not ship (/ico/undefined.svg): theirs, not a connection error.
    assert [url for url in failed if "/ico/" not in url] == []
