"""Distributed training: accelerate config files per strategy, and two CPU processes over gloo."""

from __future__ import annotations

import pytest
import yaml
from train_fixtures import make_split_and_model, small_spec

from tuneline.recipe import DistributedSpec, ModelSpec, RecipeError, TrainSpec, validate_recipe
from tuneline.store import StageRef, read_stats
from tuneline.train import launch
from tuneline.train import stage as train


@pytest.mark.slow
def test_two_cpu_processes_train_one_stage(tmp_path):
    splits, model = make_split_and_model(tmp_path)
    spec = small_spec(
        max_steps=2, distributed=DistributedSpec(strategy="ddp", processes_per_node=2, main_port=0)
    )
    lines: list[str] = []
    ref = train.run_train(tmp_path / "art", splits, model, spec, echo=lines.append)
    stats = read_stats(ref)
    assert stats["processes"] == 2 and stats["steps"] == 2
    assert stats["examples"] == 9  # the whole train split, dealt over both processes
    assert (ref.dir / "model" / "config.json").is_file()
    assert any(
        "training started; 2 steps in all" in line for line in ref.file("train.log").read_text().splitlines()
    )
    assert lines, "the workers' output reaches the caller"
    assert not train.checkpoint_dir(tmp_path / "art", ref.digest).exists()


def test_failed_workers_raise_with_the_log_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(
        launch,
        "launch_command",
        lambda config, request: ["python", "-c", "import sys; print('boom'); sys.exit(3)"],
    )
    spec = DistributedSpec(strategy="ddp", processes_per_node=2)
    request = launch.LaunchRequest(
        artifacts_dir=str(tmp_path), splits=StageRef(stage="split", digest="s0", path=str(tmp_path)),
        model=ModelSpec(name="tiny"), train=TrainSpec(), digest="d0",
    )  # fmt: skip
    with pytest.raises(launch.LaunchError, match=r"(?s)2 ddp workers failed \(exit 3\).*boom"):
        launch.launch_training(request, spec, tmp_path)
    assert "boom" in (tmp_path / launch.LOG_FILE).read_text()


def test_fsdp_and_deepspeed_configs():
    spec = DistributedSpec(
        strategy="fsdp", processes_per_node=4, nodes=2, node_rank=1, main_address="10.0.0.1"
    )
    config = launch.build_accelerate_config(spec, use_gpu=True, bf16=True)
    assert (config["distributed_type"], config["num_processes"], config["machine_rank"]) == ("FSDP", 8, 1)
    assert config["fsdp_config"]["fsdp_version"] == 2 and config["fsdp_config"]["fsdp_reshard_after_forward"]
    assert config["mixed_precision"] == "bf16" and config["main_process_ip"] == "10.0.0.1"
    yaml.safe_dump(config)  # what the launcher writes
    with pytest.raises(launch.LaunchError, match="needs CUDA GPUs"):
        launch.build_accelerate_config(spec, use_gpu=False, bf16=False)
    deepspeed = DistributedSpec(strategy="deepspeed", processes_per_node=2)
    try:
        config = launch.build_accelerate_config(deepspeed, use_gpu=True, bf16=True)
    except launch.LaunchError as error:
        assert "pip install deepspeed" in str(error)
    else:
        assert config["deepspeed_config"]["zero_stage"] == 2


@pytest.mark.parametrize(
    ("distributed", "message"),
    [
        ({"processes_per_node": 2}, "set strategy to ddp, fsdp or deepspeed"),
        ({"strategy": "ddp", "nodes": 2, "node_rank": 2}, "node_rank 2 is not below nodes 2"),
        ({"strategy": "ddp", "nodes": 2, "main_port": 0}, "one node only"),
    ],
)
def test_recipe_mistakes_name_the_field(distributed, message):
    recipe = {
        "name": "x",
        "sources": [{"name": "s", "path": "d.jsonl"}],
        "model": {"name": "m"},
        "register": {"model_name": "m"},
        "train": {"distributed": distributed},
    }
    with pytest.raises(RecipeError, match="train.distributed") as error:
        validate_recipe(recipe)
    assert message in str(error.value)
