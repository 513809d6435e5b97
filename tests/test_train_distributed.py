"""Distributed training: accelerate config files per strategy, and two CPU processes over gloo."""

from __future__ import annotations

import pytest
import yaml

from tuneline.recipe import DistributedSpec, ModelSpec, RecipeError, TrainSpec, validate_recipe
from tuneline.store import StageRef
from tuneline.train import launch


def test_failed_workers_raise_with_the_log_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(
        launch,
        "launch_command",
        lambda config, request, **_: ["python", "-c", "import sys; print('boom'); sys.exit(3)"],
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
