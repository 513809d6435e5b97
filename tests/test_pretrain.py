"""Continued pre-training: a pretrain stage (causal LM on documents and, if asked, the train
split's text) then the train stage from its model, each cached, with its ledger and MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_flow import project, recipe_for  # noqa: F401 - the flow test's project fixture and recipe
from train_fixtures import make_split_and_model, small_spec

from tuneline.experiment import TrackingTarget
from tuneline.pipeline import train_key
from tuneline.recipe import PretrainSpec
from tuneline.store import (
    DOCUMENTS,
    check_ledger,
    find_stage,
    iter_records,
    read_manifest,
    read_stats,
    sha256_file,
    write_stage,
)
from tuneline.train import layout
from tuneline.train import stage as train
from tuneline.train.pretrain import PretrainDataError, run_pretrain

DOCUMENT_TEXTS = [
    "Refunds are paid back to the card within five days of the return.",
    "   ",  # a page whose extractor found no text: dropped with its reason
    "An order ships within two days; track the parcel with its order number.",
]


def write_collected(root, texts: list[str], digest: str = "c0"):
    """A collect stage with no records and these documents (as a crawl with mode: documents gives)."""
    with write_stage(root / "art", "collect", digest) as writer:
        lines = [json.dumps({"text": text, "url": f"http://127.0.0.1/{i}"}) for i, text in enumerate(texts)]
        writer.path(DOCUMENTS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return find_stage(root / "art", "collect", digest)


def small_pretrain(**changes: object) -> PretrainSpec:
    return PretrainSpec(
        include_records=True, block_size=16, max_steps=3, batch_size=2, logging_steps=1
    ).model_copy(update=changes)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("pretrain")
    splits, model = make_split_and_model(root)
    collected = write_collected(root, DOCUMENT_TEXTS)
    target = TrackingTarget(f"sqlite:///{root}/mlflow.db", "tuneline-test", "support")
    console: list[str] = []
    pretrained = run_pretrain(
        root / "art", collected, splits, model, small_pretrain(), tracking=target, echo=console.append
    )
    trained = train.run_train(
        root / "art", splits, model, small_spec(), tracking=target, pretrained=pretrained
    )
    return {
        "root": root,
        "splits": splits,
        "model": model,
        "collected": collected,
        "target": target,
        "pretrained": pretrained,
        "trained": trained,
        "console": console,
        "client": mlflow.MlflowClient(target.tracking_uri),
    }


def test_pretrain_writes_a_full_model_that_differs_from_the_base(pipeline):
    folder = pipeline["pretrained"].file("model")
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    base = sha256_file(f"{pipeline['model'].name}/model.safetensors")
    assert sha256_file(folder / "model.safetensors") != base  # every weight trained
    stats = read_stats(pipeline["pretrained"])
    assert stats["steps"] == 3 and stats["train_loss"] > 0 and stats["blocks"] >= 3
    assert stats["tokens"] == stats["blocks"] * 16 + stats["tokens_left_out"]
    assert pipeline["pretrained"].file(layout.LOG_FILE).is_file()
    assert any(line.startswith("training step 3/3") for line in pipeline["console"])


def test_pretrain_ledger_counts_documents_and_train_records_with_reasons(pipeline):
    ledger = check_ledger(pipeline["pretrained"])
    train_records = sum(1 for _ in iter_records(pipeline["splits"], "train.jsonl"))
    assert ledger["in"] == len(DOCUMENT_TEXTS) + train_records  # validation records never go in
    assert ledger["dropped"] == {"empty_text": 1}
    (reject,) = iter_records(pipeline["pretrained"], "rejects.jsonl")
    assert reject["detail"] == "a document without text" and reject["record"]["url"].endswith("/1")
    origins = [row["origin"] for row in iter_records(pipeline["pretrained"], "pretrained.jsonl")]
    assert origins == ["document", "document", *["record"] * train_records]


def test_train_starts_from_the_pretrained_model_and_keys_on_it(pipeline):
    trained, pretrained = pipeline["trained"], pipeline["pretrained"]
    adapter = json.loads(trained.file("adapter/adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == str(pretrained.file("model"))
    plain = train_key(pipeline["model"], small_spec(), pipeline["splits"])
    assert (
        trained.digest == train_key(pipeline["model"], small_spec(), pipeline["splits"], pretrained) != plain
    )


def test_second_run_reuses_both_stages(pipeline):
    root, before = pipeline["root"], read_manifest(pipeline["trained"])["finished_at"]
    again = run_pretrain(
        root / "art", pipeline["collected"], pipeline["splits"], pipeline["model"], small_pretrain()
    )
    assert again == pipeline["pretrained"]
    trained = train.run_train(
        root / "art", pipeline["splits"], pipeline["model"], small_spec(), pretrained=again
    )
    assert trained == pipeline["trained"] and read_manifest(trained)["finished_at"] == before


def test_a_change_to_train_reruns_train_only_and_a_change_to_pretrain_reruns_both(pipeline):
    root, splits, model = pipeline["root"], pipeline["splits"], pipeline["model"]
    pretrained = run_pretrain(root / "art", pipeline["collected"], splits, model, small_pretrain())
    assert pretrained == pipeline["pretrained"]  # train.* is not pretrain's business
    retrained = train.run_train(
        root / "art", splits, model, small_spec(learning_rate=5e-3), pretrained=pretrained
    )
    assert retrained.digest != pipeline["trained"].digest
    other = run_pretrain(
        root / "art", pipeline["collected"], splits, model, small_pretrain(learning_rate=1e-4)
    )
    assert other.digest != pretrained.digest
    assert train_key(model, small_spec(), splits, other) != pipeline["trained"].digest


def test_documents_not_records_decide_pretrain_without_include_records(pipeline, tmp_path):
    root, splits, model = pipeline["root"], pipeline["splits"], pipeline["model"]
    from tuneline.pipeline import pretrain_key

    spec = small_pretrain(include_records=False)
    other_split = find_stage(root / "art", "split", "s0").model_copy(update={"digest": "elsewhere"})
    collected = pipeline["collected"]
    assert pretrain_key(model, spec, collected, splits) == pretrain_key(model, spec, collected, other_split)
    assert pretrain_key(model, small_pretrain(), collected, splits) != pretrain_key(
        model, small_pretrain(), collected, other_split
    )
    edited = write_collected(root, [*DOCUMENT_TEXTS, "A new page."], digest="c1")
    assert pretrain_key(model, spec, collected, splits) != pretrain_key(model, spec, edited, splits)


def test_each_stage_has_its_own_mlflow_run(pipeline):
    client = pipeline["client"]
    pre_run = client.get_run(read_stats(pipeline["pretrained"])["mlflow_run_id"])
    train_run = client.get_run(read_stats(pipeline["trained"])["mlflow_run_id"])
    assert pre_run.info.run_id != train_run.info.run_id
    assert (
        pre_run.data.tags["tuneline.stage"] == "pretrain" and train_run.data.tags["tuneline.stage"] == "train"
    )
    assert pre_run.info.status == "FINISHED" and pre_run.info.run_name == "support-pretrain"
    assert pre_run.data.metrics["pretrain_steps"] == 3 and pre_run.data.metrics["pretrain_train_loss"] > 0
    assert [m.step for m in client.get_metric_history(pre_run.info.run_id, "loss")] == [1, 2, 3]
    assert pre_run.data.params["pretrain.block_size"] == "16"
    assert {a.path for a in client.list_artifacts(pre_run.info.run_id)} >= {"train.log", "loss_curve.png"}


def test_too_little_text_names_the_fields_to_change(pipeline, tmp_path):
    collected = write_collected(tmp_path, ["Short page."])
    with pytest.raises(PretrainDataError) as caught:
        run_pretrain(
            tmp_path / "art",
            collected,
            pipeline["splits"],
            pipeline["model"],
            small_pretrain(include_records=False),
        )
    message = str(caught.value)
    assert (
        "not one block of pretrain.block_size 16" in message and "pretrain.include_records: true" in message
    )
    assert not list((tmp_path / "art").glob("stages/pretrain/*/manifest.json"))  # no stage written


@pytest.mark.slow
def test_the_flow_pretrains_then_trains_reuses_both_and_a_train_change_reruns_train_only(
    project,  # noqa: F811 - the fixture imported from test_flow
    prefect_server,
):
    from tuneline.flows.finetune import finetune

    pretrain = {
        "include_records": True,
        "block_size": 32,
        "max_steps": 4,
        "batch_size": 4,
        "logging_steps": 2,
    }
    first = finetune(recipe_for(project, pretrain=pretrain))
    funnel = {row["stage"]: row for row in first["funnel"]}
    assert [row["stage"] for row in first["funnel"]][-3:] == ["pretrain", "train", "evaluate"]
    assert funnel["pretrain"]["in"] == first["splits"]["train"] == funnel["train"]["in"]  # no documents here
    assert first["pretraining"]["steps"] == 4
    trained = json.loads((Path(first["stage_dirs"]["train"]) / "adapter/adapter_config.json").read_text())
    assert trained["base_model_name_or_path"] == str(Path(first["stage_dirs"]["pretrain"]) / "model")

    again = finetune(recipe_for(project, pretrain=pretrain))
    assert again["stage_dirs"] == first["stage_dirs"] and {"pretrain", "train"} <= set(again["reused"])

    changed = finetune(recipe_for(project, pretrain=pretrain, train={"learning_rate": 0.002}))
    assert changed["stage_dirs"]["pretrain"] == first["stage_dirs"]["pretrain"]
    assert changed["stage_dirs"]["train"] != first["stage_dirs"]["train"]


def test_text_files_collected_as_documents_are_what_pretrain_trains_on(pipeline, tmp_path):
    from tuneline.recipe import FileSource
    from tuneline.sources.collect import run_collect

    (tmp_path / "manual.md").write_text(
        "# Returns\n\nA lamp can be returned within thirty days of delivery.\n"
    )
    pages = [{"text": "Parcels leave the warehouse within two days."}, {"text": "Refunds take five days."}]
    (tmp_path / "pages.jsonl").write_text("".join(json.dumps(page) + "\n" for page in pages))
    sources = [FileSource(name=name, path=str(tmp_path / name)) for name in ("manual.md", "pages.jsonl")]
    collected = run_collect(tmp_path / "art", sources)
    spec = small_pretrain(include_records=False)
    ref = run_pretrain(tmp_path / "art", collected, pipeline["splits"], pipeline["model"], spec)
    rows = list(iter_records(ref, "pretrained.jsonl"))
    assert [row["origin"] for row in rows] == ["document"] * 3
    assert [row["url"] for row in rows] == [str(tmp_path / "manual.md"), *[str(tmp_path / "pages.jsonl")] * 2]
    assert check_ledger(ref) == {"in": 3, "out": 3, "dropped": {}}
    assert [input["stage"] for input in read_manifest(ref)["inputs"]] == [
        "collect"
    ]  # no split without records


def test_a_pretraining_killed_after_a_checkpoint_resumes_from_it_in_the_same_mlflow_run(
    pipeline, tmp_path, monkeypatch
):
    from tuneline.train import export

    target = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "tuneline-test", "support")
    spec = small_pretrain(max_steps=3, save_steps=2)  # checkpoint-2, then step 3, then the export
    real_export = export.export_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(export, "export_model", killed)
    args = (tmp_path / "art", pipeline["collected"], pipeline["splits"], pipeline["model"], spec)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(*args, tracking=target)
    assert not list((tmp_path / "art").glob("stages/pretrain/*/manifest.json"))
    monkeypatch.setattr(export, "export_model", real_export)
    ref = run_pretrain(*args, tracking=target)
    stats = read_stats(ref)
    assert stats["resumed_from_step"] == 2 and stats["steps"] == 3
    assert "training resumed from step 2" in ref.file(layout.LOG_FILE).read_text(encoding="utf-8")
    client = pipeline["client"].__class__(target.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tuneline-test").experiment_id])
    assert run.info.run_id == stats["mlflow_run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert not list((tmp_path / "art").glob("checkpoints/pretrain/*"))  # removed once written
