"""Distributed training: the train stage run by `accelerate launch` workers, one per GPU (or CPU slot).

The flow's process stays the parent: it writes the recipe's `train.distributed` choice as an
accelerate config file (DDP, FSDP or DeepSpeed) and a request file into the stage's checkpoint
folder, runs `accelerate launch --config_file ... -m tuneline.train.worker REQUEST` in a subprocess,
streams its output into `launch.log`, and waits. Every worker (tuneline/train/worker.py) runs the
same core training on the same inputs (`tuneline.train.stage.train_here`); the main process writes
the stage. A failed launch raises `LaunchError` with the end of the log.

On a machine without CUDA the workers train on CPU and talk over gloo (tests use two processes).

Several machines (`train.distributed.nodes`): every node runs the same recipe with its own
`node_rank`; each node's launcher keeps its files in its own folder (`node_dir`), so nodes that
share an artifacts folder do not overwrite each other's config. The workers of all nodes meet at
`main_address:main_port` and wait up to `wait_s` for each other (torchrun's static rendezvous).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from tuneline.errors import UserError
from tuneline.experiment import TrackingTarget
from tuneline.pipeline import TRAIN
from tuneline.recipe import DistributedSpec, ModelSpec, TrainSpec
from tuneline.store import StageRef, find_stage

REQUEST_FILE = "launch_request.json"
CONFIG_FILE = "accelerate_config.yaml"
LOG_FILE = "launch.log"
TAIL_LINES = 40


class LaunchError(UserError, RuntimeError):
    """Distributed training that could not start or whose workers failed; carries the log's tail."""


class LaunchRequest(BaseModel):
    """What every launched worker trains: the train stage's inputs, as the request file holds them."""

    model_config = ConfigDict(frozen=True)

    artifacts_dir: str
    splits: StageRef
    model: ModelSpec
    train: TrainSpec
    digest: str
    tracking: TrackingTarget | None = None


def needs_launch(spec: DistributedSpec) -> bool:
    """Whether training runs in launched workers rather than in the calling process."""
    return spec.strategy != "none"


def build_accelerate_config(spec: DistributedSpec, *, use_gpu: bool, bf16: bool) -> dict[str, Any]:
    """The accelerate config file's content for the recipe's strategy.

    Without CUDA the workers are launched like GPU workers (torchrun) and train on CPU over gloo:
    accelerate's own `--cpu` mode starts only one process unless MPI is installed.
    """
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": spec.world_size,
        "num_machines": spec.nodes,
        "machine_rank": spec.node_rank,
        "main_process_ip": spec.main_address,
        "main_process_port": spec.main_port,
        "mixed_precision": "bf16" if bf16 else "no",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "dynamo_config": {},
        "debug": False,
    }
    if spec.strategy in ("fsdp", "deepspeed") and not use_gpu:
        raise LaunchError(
            f"train.distributed.strategy: {spec.strategy} needs CUDA GPUs and none is visible; "
            "use ddp on CPU, or run on a GPU machine"
        )
    if spec.strategy == "fsdp":
        fsdp = spec.fsdp
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": fsdp.version,
            "fsdp_auto_wrap_policy": fsdp.wrap_policy,
            "fsdp_offload_params": fsdp.offload_params,
            "fsdp_activation_checkpointing": fsdp.activation_checkpointing,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # the stage saves one loadable model
            **(
                {"fsdp_reshard_after_forward": fsdp.sharding != "SHARD_GRAD_OP"}
                if fsdp.version == 2
                else {"fsdp_sharding_strategy": fsdp.sharding, "fsdp_use_orig_params": True}
            ),
        }
    elif spec.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise LaunchError(
                "train.distributed.strategy: deepspeed is not installed; "
                "`pip install deepspeed` on the training machines, or use fsdp or ddp"
            )
        ds = spec.deepspeed
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": ds.zero_stage,
            "offload_optimizer_device": ds.offload_optimizer,
            "offload_param_device": ds.offload_params,
            "zero3_init_flag": ds.zero_stage == 3,
            "zero3_save_16bit_model": ds.zero_stage == 3,
        }
    return config


def node_dir(work_dir: Path, spec: DistributedSpec) -> Path:
    """Where this node's launcher writes its config, request and log: the checkpoint folder on the
    main node, a sibling folder named after the node elsewhere (a shared disk keeps both apart)."""
    return work_dir if spec.node_rank == 0 else work_dir.with_name(f"{work_dir.name}.node-{spec.node_rank}")


def launch_command(config_path: Path, request_path: Path, *, join_timeout_s: int = 600) -> list[str]:
    """`accelerate launch` with the config file, running tuneline/train/worker.py in each worker;
    the workers wait up to `join_timeout_s` for the other nodes' workers to join."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "--rdzv_conf",
        f"timeout={join_timeout_s}",
        "-m",
        "tuneline.train.worker",
        str(request_path),
    ]


def launch_training(
    request: LaunchRequest, spec: DistributedSpec, work_dir: Path, echo: Callable[[str], None] | None = None
) -> None:
    """Run the training workers and wait; raises LaunchError with the log's tail if they fail.

    Each output line goes to `launch.log` in `work_dir` and to `echo` (the task's logger) when given.
    """
    from tuneline import models

    device, dtype = models.choose_device()
    work_dir.mkdir(parents=True, exist_ok=True)
    config = build_accelerate_config(spec, use_gpu=device == "cuda", bf16=dtype == torch.bfloat16)
    config_path = work_dir / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    request_path = work_dir / REQUEST_FILE
    request_path.write_text(request.model_dump_json(), encoding="utf-8")
    command = launch_command(config_path, request_path, join_timeout_s=spec.wait_s)
    if spec.nodes > 1 and echo:
        echo(
            f"node {spec.node_rank} of {spec.nodes}: {spec.processes_per_node} worker(s) wait up to "
            f"{spec.wait_s} s (train.distributed.wait_s) for every node to join at "
            f"{spec.main_address}:{spec.main_port}"
        )
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(work_dir / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if echo:
                    echo(line.rstrip("\n"))
            returncode = process.wait()
    if returncode != 0:
        log_path = work_dir / LOG_FILE
        if message := _nodes_missing(list(tail), spec):
            raise LaunchError(f"{message}; full log: {log_path}")
        raise LaunchError(
            f"train.distributed: {spec.world_size} {spec.strategy} workers failed (exit {returncode}); "
            f"full log: {log_path}{_nodes_hint(spec)}\n" + "\n".join(tail)
        )


# torch's static rendezvous, on the main node and on the others, when a node does not come.
_NOT_JOINED = re.compile(r"waiting for clients\. (\d+)/(\d+) clients joined")
_NOT_REACHED = "client socket has timed out"


def _nodes_missing(tail: list[str], spec: DistributedSpec) -> str | None:
    """The user's mistake, without torch's traceback, when the nodes never met: the main node saw
    too few join, or another node could not reach the main one, within `wait_s`."""
    address, start = f"{spec.main_address}:{spec.main_port}", "start the same recipe on every node"
    for line in reversed(tail):
        if joined := _NOT_JOINED.search(line):
            return (
                f"train.distributed: node 0 waited {spec.wait_s} s (train.distributed.wait_s) at {address} "
                f"and {joined[1]} of {joined[2]} nodes joined; {start} (each its own node_rank) within "
                f"wait_s of each other, and check that the other machines reach {address}"
            )
        if _NOT_REACHED in line:
            return (
                f"train.distributed: node {spec.node_rank} could not reach the main node at {address} "
                f"within {spec.wait_s} s (train.distributed.wait_s); {start} (node_rank 0 there), and "
                "check main_address, main_port and that the port is open between the machines"
            )
    return None


def _nodes_hint(spec: DistributedSpec) -> str:
    """What to check when a run over several machines fails for another reason."""
    if spec.nodes == 1:
        return ""
    return (
        f"; on node {spec.node_rank} of {spec.nodes}: check that every node started the same recipe "
        f"(each its own node_rank) within {spec.wait_s} s (train.distributed.wait_s) of the others and "
        f"reaches {spec.main_address}:{spec.main_port}"
    )


def wait_for_main_node(
    artifacts_dir: str | Path,
    digest: str,
    spec: DistributedSpec,
    echo: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> StageRef:
    """On a node other than the main one, once its workers are done: the train stage that the
    main node's rank 0 writes and publishes (with an object store as artifacts_dir, found there and
    copied here). Raises LaunchError after `spec.wait_s` seconds without it."""
    if echo:
        echo(
            f"node {spec.node_rank}: workers done; waiting up to {spec.wait_s} s for node 0 to "
            f"publish the train stage {digest}"
        )
    deadline = time.monotonic() + spec.wait_s
    while (ref := find_stage(artifacts_dir, TRAIN.name, digest)) is None:
        if time.monotonic() > deadline:
            raise LaunchError(
                f"train.distributed: node {spec.node_rank} trained, but the train stage {digest} did not "
                f"appear in {artifacts_dir} within {spec.wait_s} s (train.distributed.wait_s); check node "
                "0's log, that both nodes use the same artifacts_dir (an object store), or raise wait_s "
                "if saving the model takes longer"
            )
        time.sleep(poll_s)
    return ref
