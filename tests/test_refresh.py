"""The `refresh` flow and what it relies on: sources looked at again, the data's digest, a fixed
test set, and promotion only on a win.

A loopback file server gives files with an ETag (and answers 304 to a matching If-None-Match),
with only a Last-Modified date, or with no validator at all, and records every HEAD and GET.
"""

import hashlib
import http.server
import json
import os
import threading
from email.utils import formatdate
from pathlib import Path

import pytest

from tuneline.curate.split import TestFileError, run_split
from tuneline.errors import UserError
from tuneline.models import make_tiny_model
from tuneline.recipe import CrawlSource, HfSource, RecipeError, SplitSpec, UrlSource, validate_recipe
from tuneline.records import make_record
from tuneline.refresh import collected_digest
from tuneline.sources.collect import run_collect
from tuneline.sources.fetch import run_fetch
from tuneline.store import find_stage, iter_records, read_manifest, read_stats, write_stage

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "support_intents.jsonl"


class ValidatorHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under /etag/ with an ETag (304 to a matching If-None-Match), /lm/ with only
    Last-Modified, /plain/ with neither; `requests` records (method, path) of every request and
    `revalidated` the paths it answered 304."""

    folder: Path
    requests: list
    revalidated: list

    def do_HEAD(self):  # noqa: N802
        self.answer(body=False)

    def do_GET(self):  # noqa: N802
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        self.requests.append((self.command, self.path))
        kind, _, name = self.path.strip("/").partition("/")
        path = self.folder / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if kind == "etag" and self.headers.get("If-None-Match") == etag:
            self.revalidated.append(self.path)
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if path.suffix == ".html":
            self.send_header("Content-Type", "text/html")
        if kind == "etag":
            self.send_header("ETag", etag)
        elif kind == "lm":
            self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, requests, revalidated) of the validator server on an OS-chosen port."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (ValidatorHandler,), {"folder": folder, "requests": [], "revalidated": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_port}", handler.requests, handler.revalidated
    httpd.shutdown()
    httpd.server_close()


def intent_lines(start: int, count: int) -> list[str]:
    """`count` readable labelled lines of the support-intents data, from line `start`."""
    lines = []
    for line in DATA.read_text(encoding="utf-8").splitlines()[start:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["instruction"].strip() and row["output"].strip():
            lines.append(line)
        if len(lines) == count:
            return lines
    raise AssertionError("not enough data")


def write_lines(path: Path, lines: list[str], mtime: float | None = None) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def body_gets(requests: list, path: str) -> int:
    return sum(1 for method, seen in requests if method == "GET" and seen == path)


# --- the recipe ---------------------------------------------------------------------------------


def recipe_data(**sections):
    data = {
        "name": "r",
        "sources": [{"name": "a", "path": "a.jsonl"}],
        "model": {"name": "m"},
        "register": {"model_name": "r"},
    }
    return {**data, **sections}


def test_refresh_schedule_is_a_cron_or_an_interval_and_a_bad_one_names_the_field():
    cron = validate_recipe(recipe_data(refresh={"cron": "0 3 * * *"})).refresh.schedule()
    assert tuple(cron) == ("cron", "0 3 * * *", "UTC")
    every = validate_recipe(recipe_data(refresh={"interval_minutes": 1.5, "timezone": "Europe/Berlin"}))
    assert tuple(every.refresh.schedule()) == ("interval", 90.0, "Europe/Berlin")
    with pytest.raises(RecipeError, match=r"refresh.cron: not a cron expression: '0 3 \* \*'; write five"):
        validate_recipe(recipe_data(refresh={"cron": "0 3 * *"}))
    with pytest.raises(RecipeError, match=r"refresh: set exactly one of refresh.cron"):
        validate_recipe(recipe_data(refresh={"cron": "0 3 * * *", "interval_minutes": 5}))
    with pytest.raises(
        RecipeError, match=r"refresh.timezone: unknown time zone 'Berlin' \(close: Europe/Berlin\)"
    ):
        validate_recipe(recipe_data(refresh={"interval_minutes": 5, "timezone": "Berlin"}))


def test_unset_refresh_and_test_file_move_no_digest():
    plain = validate_recipe(recipe_data())
    scheduled = validate_recipe(recipe_data(refresh={"cron": "0 3 * * *"}))
    assert scheduled.digest() == plain.digest()  # a schedule registers no model again
    assert "test_file" not in plain.split.model_dump() and "refresh" not in plain.model_dump()


# --- fetch: looking again ----------------------------------------------------------------------


def test_a_changed_file_with_only_last_modified_and_the_same_size_is_downloaded_again(server, tmp_path):
    """Before, size and ETag alone were the fingerprint: the change went unseen."""
    folder, url, requests, _ = server
    write_lines(folder / "d.jsonl", intent_lines(0, 5), mtime=1_700_000_000)
    source = UrlSource(name="d", url=f"{url}/lm/d.jsonl")
    first = run_fetch(tmp_path / "store", source)
    assert run_fetch(tmp_path / "store", source) == first
    assert body_gets(requests, "/lm/d.jsonl") == 1
    text = (folder / "d.jsonl").read_text().replace("get me a manager", "GET ME A MANAGER")
    (folder / "d.jsonl").write_text(text)  # the same size, a new date
    os.utime(folder / "d.jsonl", (1_700_000_100, 1_700_000_100))
    second = run_fetch(tmp_path / "store", source)
    assert second != first and body_gets(requests, "/lm/d.jsonl") == 2


def test_a_refresh_downloads_a_file_without_validators_again_and_its_content_decides(server, tmp_path):
    folder, url, requests, _ = server
    write_lines(folder / "d.jsonl", intent_lines(0, 5))
    source = UrlSource(name="d", url=f"{url}/plain/d.jsonl")
    first = run_fetch(tmp_path / "store", source, refresh="r1")
    assert run_fetch(tmp_path / "store", source, refresh="r2") == first  # same bytes: same stage
    assert body_gets(requests, "/plain/d.jsonl") == 2
    text = (folder / "d.jsonl").read_text().replace("get me a manager", "GET ME A MANAGER")
    (folder / "d.jsonl").write_text(text)
    changed = run_fetch(tmp_path / "store", source, refresh="r3")
    assert changed != first and read_stats(changed)["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert not any((tmp_path / "store" / "downloads").iterdir()), "no download left behind"


def test_a_refresh_crawls_again_and_revalidates_cached_pages_where_a_plain_run_reuses_the_crawl(
    server, tmp_path
):
    folder, url, requests, revalidated = server
    words = "Refunds take five days after the parcel is back. " * 20
    (folder / "page.html").write_text(
        f"<html><head><title>Refunds</title></head><body><p>{words}</p></body></html>"
    )
    source = CrawlSource(name="docs", start_urls=[f"{url}/etag/page.html"], max_depth=0, allow_private=True)
    first = run_fetch(tmp_path / "store", source)
    assert run_fetch(tmp_path / "store", source) == first  # a plain run reuses the crawl
    assert body_gets(requests, "/etag/page.html") == 1
    again = run_fetch(tmp_path / "store", source, refresh="r1")
    assert again != first and body_gets(requests, "/etag/page.html") == 2, "the refresh asked the site again"
    assert revalidated == ["/etag/page.html"]  # asked with its ETag: 304, the cached page is reused
    collected = [run_collect(tmp_path / "store", [source], [ref]) for ref in (first, again)]
    assert collected_digest(collected[0]) == collected_digest(collected[1])  # same page, same data


def test_hf_sources_record_the_revision_of_local_data_by_content(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    fetched = run_fetch(tmp_path / "store", HfSource(name="qa", dataset=str(folder)))
    assert read_stats(fetched)["revision"].startswith("content:")
    single = run_fetch(tmp_path / "store", HfSource(name="one", dataset=str(folder / "train.jsonl")))
    digest = hashlib.sha256((folder / "train.jsonl").read_bytes()).hexdigest()
    assert read_stats(single)["revision"] == f"sha256:{digest}"


# --- split: a fixed test set -------------------------------------------------------------------


def labelled(question: str, label: str) -> dict:
    return make_record([{"role": "user", "content": question}, {"role": "assistant", "content": label}])


def test_a_test_file_is_the_test_split_and_its_records_stay_out_of_training(tmp_path):
    records = [labelled(f"question number {i} about my order", f"label{i % 3}") for i in range(40)]
    with write_stage(tmp_path / "store", "gate", "g0") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    gated = find_stage(tmp_path / "store", "gate", "g0")
    test_file = tmp_path / "test.jsonl"
    outside = labelled("a question only the test file asks", "label9")
    test_file.write_text("".join(json.dumps(r) + "\n" for r in [records[0], records[1], outside]))
    splits = run_split(tmp_path / "store", gated, SplitSpec(test_file=str(test_file), decontaminate=False))
    assert [r["id"] for r in iter_records(splits, "test.jsonl")] == [
        records[0]["id"],
        records[1]["id"],
        outside["id"],
    ]
    trained = {r["id"] for name in ("train.jsonl", "validation.jsonl") for r in iter_records(splits, name)}
    assert not trained & {records[0]["id"], records[1]["id"]}
    assert len(trained) == 38 and read_manifest(splits)["ledger"]["dropped"] == {"in_test_file": 2}
    assert read_stats(splits)["counts"]["test"] == 3
    test_file.write_text("{not json\n")
    with pytest.raises(TestFileError, match=r"split.test_file: .*test.jsonl:1: "):
        run_split(tmp_path / "store", gated, SplitSpec(test_file=str(test_file)))


# --- the refresh flow ---------------------------------------------------------------------------

DOWNSTREAM_FREE = {"tidy_store", "fetch", "collect", "refresh_check", "refresh_record"}


def flow_task_names(flow_run_id) -> set[str]:
    """The tasks a flow run ran, by task name (`fetch-tagged` -> fetch)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split("-")[0] for run in runs}


def refresh_recipe(root: Path, url: str, strong: bool, **register):
    """Two URL sources (one with an ETag, one with only Last-Modified) and a tiny model; `strong`
    training learns the labels, the weak one leaves the base model almost as it was."""
    steps, rate = (30, 3e-3) if strong else (1, 1e-6)
    return validate_recipe(
        {
            "name": "refresh-test",
            "artifacts_dir": str(root / "store"),
            "sources": [
                {"kind": "url", "name": "tagged", "url": f"{url}/etag/a.jsonl"},
                {"kind": "url", "name": "dated", "url": f"{url}/lm/b.jsonl"},
            ],
            "clean": {"workers": 1},
            "gate": {"min_records": 10},
            "model": {"name": str(root / "base")},
            "train": {
                "max_steps": steps, "learning_rate": rate, "batch_size": 16, "max_length": 96,
                "lora": {"r": 8, "alpha": 16, "modules_to_save": ["embed_tokens", "lm_head"]},
            },
            "evaluate": {"max_new_tokens": 4},
            "register": {
                "model_name": "refresh-test", "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "promote_metric": "loss", **register,
            },
        }
    )  # fmt: skip


def change_a_line(path: Path, mtime: float | None = None) -> None:
    """The same size, other content (one question upper-cased), and a new date when given."""
    lines = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[0])
    lines[0] = lines[0].replace(row["instruction"], row["instruction"].upper())
    write_lines(path, lines, mtime)


@pytest.mark.slow
def test_refresh_trains_only_on_changed_data_on_a_fixed_test_set_and_promotes_only_on_a_win(
    server, tmp_path, prefect_server
):
    from tuneline.flows.refresh import refresh

    folder, url, requests, _ = server
    lines = intent_lines(100, 120)
    write_lines(folder / "a.jsonl", lines[:60])
    write_lines(folder / "b.jsonl", lines[60:], mtime=1_700_000_000)
    words = [json.loads(line)[key] for line in lines for key in ("instruction", "output")]
    make_tiny_model(tmp_path / "base", words, vocab_size=300, hidden_size=48, num_layers=2, num_heads=4)

    first = refresh(refresh_recipe(tmp_path, url, strong=False))
    assert first["status"] == "trained" and first["reason"] == "first refresh"
    assert first["promoted"] is True and first["registered"]["version"] == "1"
    pinned = Path(first["test_file"])
    assert pinned == tmp_path / "store" / "refresh" / "refresh-test" / "test.jsonl"
    pinned_bytes = pinned.read_bytes()
    split_dir = Path(json.loads((Path(first["run_dir"]) / "report.json").read_text())["stage_dirs"]["split"])
    assert pinned_bytes == (split_dir / "test.jsonl").read_bytes()

    # Nothing changed: HEADs only (no body downloaded), and no task after collect ran.
    gets = len([r for r in requests if r[0] == "GET"])
    state = refresh(refresh_recipe(tmp_path, url, strong=False), return_state=True)
    unchanged = state.result()
    assert unchanged["status"] == "unchanged" and unchanged["registered"] is None
    assert unchanged["digest"] == first["digest"]
    assert len([r for r in requests if r[0] == "GET"]) == gets
    assert requests[-2:] in ([("HEAD", "/etag/a.jsonl"), ("HEAD", "/lm/b.jsonl")],
                             [("HEAD", "/lm/b.jsonl"), ("HEAD", "/etag/a.jsonl")])  # fmt: skip
    assert flow_task_names(state.state_details.flow_run_id) <= DOWNSTREAM_FREE

    # A changed file (same size, only its Last-Modified says so): trains, compared on the pinned set.
    change_a_line(folder / "b.jsonl", mtime=1_700_000_500)
    better = refresh(refresh_recipe(tmp_path, url, strong=True))
    assert better["status"] == "trained" and better["reason"].startswith("the collected data changed")
    assert body_gets(requests, "/lm/b.jsonl") == 2 and body_gets(requests, "/etag/a.jsonl") == 1
    report = json.loads((Path(better["run_dir"]) / "report.json").read_text())
    assert read_stats_at(report["stage_dirs"]["split"])["test_file"] == str(pinned)
    predicted = [row["id"] for row in iter_jsonl_at(report["stage_dirs"]["evaluate"], "predictions.jsonl")]
    assert predicted == [json.loads(line)["id"] for line in pinned_bytes.decode().splitlines()]
    assert report["evaluation"]["champion_version"] == "1"  # the champion scored on the same set
    assert better["promoted"] is True, better["registered"]["reason"]
    assert "vs champion v1" in better["registered"]["reason"]

    # Changed again, but a win must now be by more than a margin it cannot reach: not promoted.
    change_a_line(folder / "a.jsonl")
    held = refresh(refresh_recipe(tmp_path, url, strong=True, margin=1000))
    assert held["status"] == "trained" and held["promoted"] is False
    assert "does not beat it by more than the margin 1000" in held["registered"]["reason"]
    assert pinned.read_bytes() == pinned_bytes
    state_file = json.loads((tmp_path / "store" / "refresh" / "refresh-test.json").read_text())
    assert state_file["digest"] == held["digest"] and state_file["registered"]["version"] == "3"


def read_stats_at(folder: str) -> dict:
    return json.loads((Path(folder) / "stats.json").read_text())


def iter_jsonl_at(folder: str, name: str):
    return (json.loads(line) for line in (Path(folder) / name).read_text().splitlines())


def test_a_refresh_without_a_test_set_to_pin_is_refused_before_training():
    from tuneline.refresh import with_test_file

    recipe = validate_recipe(
        {
            "name": "no-test",
            "sources": [{"name": "tickets", "path": "tickets.jsonl"}],
            "split": {"test": 0},
            "model": {"name": "base"},
            "register": {"model_name": "no-test"},
        }
    )
    with pytest.raises(UserError, match=r"split.test is 0 and split.test_file is unset.*set split.test"):
        with_test_file(recipe, None)
    own = recipe.model_copy(update={"split": recipe.split.model_copy(update={"test_file": "held-out.jsonl"})})
    assert with_test_file(own, None) is own  # the recipe's own test set: nothing to pin
