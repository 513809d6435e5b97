"""Two training nodes on loopback: two `accelerate launch` runs with machine ranks 0 and 1 (one gloo
worker each on CPU) train one train stage through an object store (moto's S3 server), and it
equals a one-node run with two workers (which also stands for distributed training on one
machine: the whole split dealt over two processes).

Each node has its own local folder bound to one bucket prefix, as two machines would: node 1 gets
the split stage from the store, and the trained stage that node 0 publishes there.

The reference is one node with 2 processes, not 1 process with a batch twice as large: under DDP
the two layouts are the same computation (global ranks 0 and 1, the same data shards, the same
gradient all-reduce over gloo), so the weights agree to the bit; a single process with the doubled
batch pads and reduces in another order and agrees only to float rounding.

Also: what a node says when the others never come, a fresh start on every node, and node 1's
flow ending after the train stage.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from s3_server import s3_server  # noqa: F401  (fixture)
from safetensors.torch import load_file
from train_fixtures import make_split_and_model, small_spec

from tuneline.objectstore import open_artifacts
from tuneline.pipeline import train_key
from tuneline.recipe import DistributedSpec, ModelSpec, validate_recipe
from tuneline.store import (
    StageRef,
    find_stage,
    iter_records,
    read_manifest,
    read_stats,
    verify_stage,
    write_stage,
)
from tuneline.train import launch
from tuneline.train import stage as train

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "support_intents.jsonl"


def free_port() -> int:
    """A port the OS says is free now (both nodes must know it before either starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weights(ref: StageRef) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a train stage (adapter and merged model)."""
    tensors = {}
    for path in sorted(ref.dir.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(ref.dir)}:{name}"] = tensor
    return tensors


def run_in_thread(results: dict[str, object], key: str, *args: object, **kwargs: object) -> threading.Thread:
    """`train.run_train(*args)` in a thread (its workers are processes); the result or error in `results`."""

    def target() -> None:
        try:
            results[key] = train.run_train(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - reported by the test
            results[key] = error

    thread = threading.Thread(target=target, name=key)
    thread.start()
    return thread


@pytest.mark.slow
def test_two_nodes_train_the_stage_of_one_node(tmp_path, s3_server):  # noqa: F811
    url = f"s3://{s3_server.bucket()}/team/project"
    folders = [open_artifacts(url, str(tmp_path / "art")), open_artifacts(url, str(tmp_path / "node1"))]
    splits, model = make_split_and_model(tmp_path)  # written on node 0 (tmp_path/art), published
    assert not (folders[1] / "stages").exists()
    node_splits = [splits, find_stage(folders[1], "split", splits.digest)]  # node 1's from the store
    assert Path(node_splits[1].path).is_relative_to(folders[1])
    port = free_port()
    one_node = small_spec(
        max_steps=2, distributed=DistributedSpec(strategy="ddp", processes_per_node=2, main_port=0)
    )
    results: dict[str, object] = {}
    logs: dict[str, list[str]] = {"one_node": [], "node0": [], "node1": []}
    threads = [
        run_in_thread(
            results, "one_node", tmp_path / "one", splits, model, one_node, echo=logs["one_node"].append
        )
    ]
    for rank in (0, 1):
        spec = small_spec(
            max_steps=2,
            distributed=DistributedSpec(strategy="ddp", nodes=2, node_rank=rank, main_port=port),
        )
        key = f"node{rank}"
        threads.append(
            run_in_thread(results, key, folders[rank], node_splits[rank], model, spec, echo=logs[key].append)
        )
    for thread in threads:
        thread.join(timeout=300)
    errors = {key: value for key, value in results.items() if isinstance(value, BaseException)}
    assert not errors, errors
    node0, node1, reference = results["node0"], results["node1"], results["one_node"]
    assert node0.digest == node1.digest != reference.digest  # nodes and processes_per_node differ
    assert Path(node1.path).is_relative_to(folders[1])  # read back from the store
    verify_stage(node1)  # its files match the manifest node 0 committed, so they are node 0's
    assert read_manifest(node1)["files"] == read_manifest(node0)["files"]
    expected, got = weights(reference), weights(node0)
    assert expected.keys() == got.keys() and expected
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=0), name  # bit for bit
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in got.items())  # it trained
    for ref in (reference, node0):
        stats = read_stats(ref)
        assert stats["processes"] == 2 and stats["steps"] == 2
        assert stats["examples"] == 9  # the whole train split, dealt over both processes
        assert "training started; 2 steps in all" in ref.file("train.log").read_text()
        assert (ref.dir / "model" / "config.json").is_file()
        assert not train.checkpoint_dir(ref.dir.parents[2], ref.digest).exists()
    assert any("training step 2/2" in line for line in logs["one_node"]), "workers' output reaches the caller"
    assert any("node 1 of 2: 1 worker(s) wait up to 600 s" in line for line in logs["node1"])


def test_a_node_whose_main_node_never_publishes_names_wait_s(tmp_path):
    spec = DistributedSpec(strategy="ddp", nodes=2, node_rank=1, wait_s=1)
    lines: list[str] = []
    with pytest.raises(launch.LaunchError, match=r"within 1 s \(train.distributed.wait_s\)") as error:
        launch.wait_for_main_node(tmp_path, "d0", spec, echo=lines.append, poll_s=0.2)
    assert "check node 0's log" in str(error.value)
    assert lines == ["node 1: workers done; waiting up to 1 s for node 0 to publish the train stage d0"]


def test_each_node_launches_from_its_own_folder(tmp_path, monkeypatch):
    """Nodes that share an artifacts folder must not overwrite each other's accelerate config
    (both read machine_rank 0 and the second launch failed on a busy port)."""
    work_dir = tmp_path / "checkpoints" / "train" / "d0"
    node_dirs = [
        launch.node_dir(work_dir, DistributedSpec(strategy="ddp", nodes=2, node_rank=rank)) for rank in (0, 1)
    ]
    assert node_dirs == [work_dir, Path(f"{work_dir}.node-1")]
    monkeypatch.setattr(launch, "launch_command", lambda config, request, **_: ["python", "-c", "exit(1)"])
    spec = DistributedSpec(strategy="ddp", nodes=2, node_rank=1, main_address="10.0.0.1", main_port=29400)
    request = launch.LaunchRequest(
        artifacts_dir=str(tmp_path), splits=StageRef(stage="split", digest="s0", path=str(tmp_path)),
        model=ModelSpec(name="tiny"), train=small_spec(), digest="d0",
    )  # fmt: skip
    with pytest.raises(launch.LaunchError, match="reaches 10.0.0.1:29400") as error:
        launch.launch_training(request, spec, node_dirs[1])
    assert "every node started the same recipe (each its own node_rank) within 600 s" in str(error.value)


# What torch 2.13's static rendezvous printed here when the other node never came (wait_s 20).
MAIN_ALONE = (
    "torch.distributed.DistStoreError: Timed out after 21 seconds waiting for clients. 1/2 clients joined."
)
MAIN_UNREACHED = (
    "torch.distributed.DistNetworkError: The client socket has timed out after 20000ms while trying to "
    "connect to (10.0.0.1, 29400)."
)


@pytest.mark.parametrize(
    ("node_rank", "printed", "message"),
    [
        (
            0,
            MAIN_ALONE,
            "node 0 waited 600 s (train.distributed.wait_s) at 10.0.0.1:29400 and 1 of 2 nodes joined",
        ),
        (1, MAIN_UNREACHED, "node 1 could not reach the main node at 10.0.0.1:29400 within 600 s"),
    ],
)
def test_a_node_that_never_meets_the_other_says_so(tmp_path, monkeypatch, node_rank, printed, message):
    script = f"print('Traceback (most recent call last):'); print({printed!r}); exit(1)"
    monkeypatch.setattr(launch, "launch_command", lambda config, request, **_: [sys.executable, "-c", script])
    spec = DistributedSpec(
        strategy="ddp", nodes=2, node_rank=node_rank, main_address="10.0.0.1", main_port=29400
    )
    request = launch.LaunchRequest(
        artifacts_dir=str(tmp_path), splits=StageRef(stage="split", digest="s0", path=str(tmp_path)),
        model=ModelSpec(name="tiny"), train=small_spec(), digest="d0",
    )  # fmt: skip
    with pytest.raises(launch.LaunchError) as error:
        launch.launch_training(request, spec, tmp_path)
    assert message in str(error.value) and "Traceback" not in str(error.value)


def test_a_fresh_start_drops_the_old_checkpoints_on_every_node(tmp_path, monkeypatch):
    """With `train.resume: fresh` node 0 starts at step 0, so node 1 must too: a checkpoint left in
    its own folder would have its workers resume where node 0's do not."""
    splits, model = StageRef(stage="split", digest="s0", path=str(tmp_path)), ModelSpec(name="tiny")
    distributed = DistributedSpec(strategy="ddp", nodes=2, node_rank=1, main_port=29400)
    spec = small_spec(resume="fresh", distributed=distributed)
    digest = train_key(model, spec, splits)
    old = train.checkpoint_dir(tmp_path, digest) / "checkpoint-2"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text('{"global_step": 2}')
    seen = {}

    def launched(request, spec, work_dir, echo=None):
        seen["old checkpoint at launch"] = old.exists()
        with write_stage(tmp_path, "train", digest):  # node 0 publishes the stage
            pass

    monkeypatch.setattr(launch, "launch_training", launched)
    monkeypatch.setattr(train, "download_checkpoint", lambda *args: pytest.fail("fresh downloads nothing"))
    assert train.run_train(tmp_path, splits, model, spec).digest == digest
    assert seen == {"old checkpoint at launch": False}


@pytest.mark.slow
def test_the_second_nodes_run_ends_after_the_train_stage(tmp_path, prefect_server, monkeypatch):
    """Node 1's flow lends its workers to the training and ends there: evaluate and register run
    once, on node 0, not once per node. Node 0 is played by a launcher that publishes the stage."""
    from tuneline.flows.finetune import finetune

    lines = DATA.read_text().splitlines()[:120]
    (tmp_path / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    _, model = make_split_and_model(tmp_path)

    def node0_publishes(request, spec, work_dir, echo=None):
        with write_stage(request.artifacts_dir, "train", request.digest, [request.splits]) as writer:
            for record in iter_records(request.splits, "train.jsonl"):
                writer.count_in()
                writer.keep({"id": record["id"]}, "trained.jsonl")

    monkeypatch.setattr(launch, "launch_training", node0_publishes)
    recipe = validate_recipe(
        {
            "name": "node-1",
            "artifacts_dir": str(tmp_path / "node1"),
            "sources": [{"name": "tickets", "path": str(tmp_path / "tickets.jsonl")}],
            "gate": {"min_records": 50, "min_chars": 1, "max_chars": 400},
            "model": {"name": model.name},
            "train": {"distributed": {"strategy": "ddp", "nodes": 2, "node_rank": 1, "main_port": 29400}},
            "register": {"model_name": "node-1"},
        }
    )
    summary = finetune(recipe)
    assert [row["stage"] for row in summary["funnel"]][-2:] == ["split", "train"]
    assert "evaluation" not in summary and "registry" not in summary
    assert not (tmp_path / "node1" / "stages" / "evaluate").exists()
