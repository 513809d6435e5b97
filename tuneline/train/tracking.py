"""Training telemetry: the training log, the loss curve, and metrics to an MLflow run.

The train stage opens the MLflow run (the register stage later reuses it, see tuneline/register/stage.py)
and a `TrackingCallback` writes, at every logging step, loss, learning rate, tokens per second and
memory (RSS on CPU, peak allocated on GPU) to it and one line to `train.log`. The log lives in the
checkpoint folder, so a killed and resumed run keeps one log and one MLflow run. Only the main
process of a distributed run tracks.

A resumed run reports the whole training, not only its own steps: every checkpoint step is also a
logging step (so the checkpoint's log history ends exactly where training resumes), the MLflow run
gets each logging step once (steps the killed attempt already logged are not logged again, steps
of the checkpoint's history the run lacks are logged first), and the trainer's end-of-run summary,
which covers this process only, stays out of the run (the train stage logs whole-run figures).

What a person sees: with `echo` (the task's Prefect log), one concise line per logging step
(`progress_line`). When stderr is a terminal, a single tqdm bar there (steps, loss, tokens/s, time
left) takes the place of those lines on the console; the Prefect log still gets them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tuneline.experiment import TrackingTarget, is_number, open_experiment, prefixed_metrics, truncate_params
from tuneline.pipeline import TRAIN

RUN_FILE = "mlflow_run.json"
PROGRESS_PREFIX = "training step "  # how progress_line starts: the lines a terminal bar replaces
BAR_FIGURES = {"loss": "loss {:.4g}", "eval_loss": "eval_loss {:.4g}", "tokens_per_second": "{:.0f} tokens/s"}
CONSOLE_LOGGERS = ("", "prefect", "prefect.task_runs", "prefect.flow_runs")  # where console handlers sit


def open_run(target: TrackingTarget, artifacts_dir: Path, work_dir: Path, stage: str = TRAIN.name) -> str:
    """The MLflow run id for this training (tagged with its `stage`, train or pretrain): the one a
    killed run left in `work_dir` when it still exists in the store, else a new run (its id kept
    in `work_dir` for the next resume)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = open_experiment(target.tracking_uri, target.experiment, artifacts_dir)
    client = mlflow.MlflowClient()
    saved = Path(work_dir) / RUN_FILE
    if saved.is_file():
        run_id = json.loads(saved.read_text(encoding="utf-8"))["run_id"]
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id:
                if run.info.status != "RUNNING":  # a failed attempt's run, going on
                    client.update_run(run_id, status="RUNNING")
                return run_id
        except MlflowException:
            pass  # the store was wiped since: start a new run
    run_id = client.create_run(
        experiment_id, run_name=target.run_name, tags={"tuneline.stage": stage}
    ).info.run_id
    saved.write_text(json.dumps({"run_id": run_id, "target": asdict(target)}), encoding="utf-8")
    return run_id


def fail_run(target: TrackingTarget, run_id: str) -> None:
    """Mark the run FAILED (a re-run that resumes the training reopens it)."""
    import mlflow

    mlflow.MlflowClient(target.tracking_uri).set_terminated(run_id, status="FAILED")


def log_params(target: TrackingTarget, run_id: str, params: dict[str, Any]) -> None:
    """The resolved training configuration as run params (values cut to MLflow's length limit).

    A param already logged with the same value (a resumed run) is fine; MLflow refuses a change.
    """
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(target.tracking_uri)
    logged = client.get_run(run_id).data.params
    fresh = [Param(key, value) for key, value in truncate_params(params).items() if key not in logged]
    for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=fresh[start : start + 100])


def finish_run(
    target: TrackingTarget, run_id: str, files: list[Path], stats: dict[str, Any], stage: str = TRAIN.name
) -> None:
    """Attach the loss curve and training log, log the summary numbers (`<stage>_*`) and end the run.

    The register stage reopens the run to add evaluation metrics and the model.
    """
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(target.tracking_uri)
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    now = int(time.time() * 1000)
    step = int(stats.get("steps") or 0)
    numbers = prefixed_metrics(stats, stage)
    client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in numbers.items()])
    client.set_terminated(run_id)


def memory_bytes() -> int:
    """Peak GPU memory allocated by torch on CUDA, else this process's resident memory."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


class TrackingCallback(TrainerCallback):
    """At every logging step: one line to the training log and the numbers to the MLflow run.

    It also counts the optimizer steps this process ran (`steps_run`), which is how a resumed run
    shows it did not repeat the steps its checkpoint already held, and the tokens per second.
    Checkpoint steps are made logging steps, so a resumed run's figures can be rebuilt exactly.
    """

    def __init__(
        self,
        log_path: Path,
        target: TrackingTarget | None = None,
        run_id: str | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.echo = echo  # the caller's console: told where training starts (or resumes) and ends
        self.target = target
        self.run_id = run_id
        self.steps_run = 0
        self.start_step = 0
        self.tokens_run = 0.0
        self.seconds = 0.0
        self._started = 0.0
        self._last_time = 0.0
        self._last_tokens: float | None = None
        self._in_run: dict[str, set[int]] = {"loss": set(), "eval_loss": set()}  # steps the run holds
        self.bar = TerminalProgress() if TerminalProgress.wanted() else None

    def write(self, line: str, echo: bool = False) -> None:
        """Append one timestamped line to the training log (and, with `echo`, to the console)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {line}\n")
        if echo and self.echo:
            self.echo(line)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note where this process starts (a resumed run starts at its checkpoint's step)."""
        self.start_step = state.global_step
        self._started = self._last_time = time.perf_counter()
        # A resumed trainer counts tokens on from its checkpoint's count (tuneline/train/stage.py).
        self._last_tokens = last_logged(state.log_history, "num_tokens")
        if state.is_world_process_zero:
            where = f"resumed from step {state.global_step}" if state.global_step else "started"
            self.write(f"training {where}; {state.max_steps} steps in all", echo=True)
            if self.bar:
                self.bar.start(state.global_step, state.max_steps)
            if self.target and self.run_id:
                self._catch_up_run(state.log_history)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Count the steps run by this process; log at every checkpoint step.

        A checkpoint's log history then ends at its own step, so a run resumed from it rebuilds
        the whole training's loss and token count from that history (tuneline/train/stage.py).
        """
        self.steps_run += 1
        if self.bar:
            self.bar.step()
        if control.should_save:
            control.should_log = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Training logs: rate and memory added, written to the log and the MLflow run."""
        if not logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        numbers = {key: float(value) for key, value in logs.items() if is_number(value)}
        if "loss" in numbers and "num_tokens" in numbers:
            tokens = numbers["num_tokens"]
            previous = (
                self._last_tokens if self._last_tokens is not None and tokens >= self._last_tokens else 0.0
            )
            elapsed = now - self._last_time
            if elapsed > 0:
                numbers["tokens_per_second"] = (tokens - previous) / elapsed
            self.tokens_run += tokens - previous
            self._last_tokens, self._last_time = tokens, now
            self.seconds = now - self._started  # the span the counted tokens took
        if "loss" in numbers or "eval_loss" in numbers:  # not on the end-of-training summary
            numbers["memory_mb"] = memory_bytes() / 2**20
        shown = " ".join(f"{key}={value:.6g}" for key, value in sorted(numbers.items()))
        self.write(f"step {state.global_step}: {shown}")
        if "loss" in numbers or "eval_loss" in numbers:
            if self.echo:
                self.echo(self.progress_line(state, numbers, now))
            if self.bar:
                self.bar.show(numbers)
        kind = _log_kind(numbers)  # None: the trainer's end-of-run summary, of this process's steps only
        if self.target and self.run_id and kind and state.global_step not in self._in_run[kind]:
            self._log_metrics(numbers, state.global_step)
            self._in_run[kind].add(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the log with the step reached and the measured rate."""
        if self.bar:
            self.bar.close()
        if state.is_world_process_zero:
            self.write(
                f"training ended at step {state.global_step}: {self.steps_run} steps run by this process, "
                f"{self.tokens_per_second() or 0:.1f} tokens/s",
                echo=True,
            )

    def _catch_up_run(self, history: list[dict[str, Any]]) -> None:
        """Note the steps the MLflow run holds (a killed attempt logged some past its checkpoint;
        they are not logged twice) and log the checkpoint's logging steps it lacks (a new run)."""
        import mlflow

        client = mlflow.MlflowClient(self.target.tracking_uri)
        for kind, steps in self._in_run.items():
            steps.update(metric.step for metric in client.get_metric_history(self.run_id, kind))
        for entry in history:
            numbers = {key: float(value) for key, value in entry.items() if is_number(value)}
            kind, step = _log_kind(numbers), int(numbers.pop("step"))
            if kind and step not in self._in_run[kind]:
                self._log_metrics(numbers, step)
                self._in_run[kind].add(step)

    def _log_metrics(self, numbers: dict[str, float], step: int) -> None:
        import mlflow
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in numbers.items()]
        mlflow.MlflowClient(self.target.tracking_uri).log_batch(self.run_id, metrics=metrics)

    def progress_line(self, state: Any, numbers: dict[str, float], now: float) -> str:
        """One line for a person watching the task's log: where it is, the loss, the pace, time left."""
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in numbers:
            parts.append(f"loss {numbers['loss']:.4g}")
        if "eval_loss" in numbers:
            parts.append(f"eval_loss {numbers['eval_loss']:.4g}")
        if "tokens_per_second" in numbers:
            parts.append(f"{numbers['tokens_per_second']:.0f} tokens/s")
        done = state.global_step - self.start_step
        if done > 0 and state.max_steps > state.global_step:
            left = (now - self._started) / done * (state.max_steps - state.global_step)
            parts.append(f"{int(left // 60)}:{int(left % 60):02d} left")
        return "training " + ", ".join(parts)  # "training step ...": PROGRESS_PREFIX

    def tokens_per_second(self) -> float | None:
        """Real (non-padding) tokens per second over this process's training."""
        return self.tokens_run / self.seconds if self.tokens_run and self.seconds else None


class TerminalProgress:
    """One tqdm bar on stderr for a person at a terminal: steps, loss, tokens/s and time left.

    While it shows, console handlers writing to a terminal skip the per-step progress lines (the
    bar says the same in place); handlers that are not consoles, such as Prefect's API log, keep them.
    """

    def __init__(self) -> None:
        self.bar: Any = None
        self.hide = _HideProgressLines()
        self.handlers: list[logging.Handler] = []

    @staticmethod
    def wanted() -> bool:
        """Whether a person watches: stderr is a terminal (not CI, a pipe or a launched worker)."""
        return sys.stderr.isatty()

    def start(self, step: int, total: int) -> None:
        from tqdm import tqdm

        # disable=False: `tuneline run` sets TQDM_DISABLE to keep library bars out of the logs.
        self.bar = tqdm(total=total, initial=step, desc="training", unit="step", file=sys.stderr,
                        disable=False, dynamic_ncols=True)  # fmt: skip
        self.handlers = [handler for handler in _console_handlers() if self.hide not in handler.filters]
        for handler in self.handlers:
            handler.addFilter(self.hide)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, numbers: dict[str, float]) -> None:
        """The latest loss (and validation loss) and rate beside the bar."""
        if self.bar is None:
            return
        parts = [form.format(numbers[key]) for key, form in BAR_FIGURES.items() if key in numbers]
        self.bar.set_postfix_str(", ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for handler in self.handlers:
            handler.removeFilter(self.hide)
        self.handlers = []


class _HideProgressLines(logging.Filter):
    """Drops the per-step progress lines (a terminal bar shows them) and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PROGRESS_PREFIX)


def _console_handlers() -> list[logging.Handler]:
    """The logging handlers that write to a terminal: Prefect's console and the root's."""
    handlers = []
    for name in CONSOLE_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "isatty", lambda: False)():
                handlers.append(handler)
    return handlers


def _log_kind(numbers: dict[str, float]) -> str | None:
    """A training log ("loss"), an evaluation ("eval_loss"), or neither (the end-of-run summary)."""
    return "loss" if "loss" in numbers else "eval_loss" if "eval_loss" in numbers else None


def last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    """The latest value of `key` in a trainer's log history, or None."""
    values = [entry[key] for entry in history if is_number(entry.get(key))]
    return float(values[-1]) if values else None


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training (and validation) loss by step as a PNG; None when nothing was logged."""
    train = [(row["step"], row["loss"]) for row in history if is_number(row.get("loss"))]
    evals = [(row["step"], row["eval_loss"]) for row in history if is_number(row.get("eval_loss"))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def resolved_config(trainer: Any, method: dict[str, Any], loss_mode: str) -> dict[str, Any]:
    """What training actually used, as flat params: the resolved method (`method.*`), the peft
    config the trainer holds (`peft.<adapter>.*`) and the SFT settings (`sft.*`)."""
    params: dict[str, Any] = {"loss_mode": loss_mode}
    params |= {f"method.{key}": _param(value) for key, value in method.items()}
    for name, config in (getattr(trainer.model, "peft_config", None) or {}).items():
        params |= {f"peft.{name}.{key}": _param(value) for key, value in config.to_dict().items()}
    params |= {f"sft.{key}": _param(getattr(trainer.args, key, None)) for key in SFT_PARAMS}
    return params


def _param(value: Any) -> str:
    """A param value as text: scalars as they print, containers as JSON (sets sorted)."""
    if isinstance(value, set):
        value = sorted(value, key=str)
    return json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)


# The SFT settings logged as params beside the method's configuration.
SFT_PARAMS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "max_length",
    "packing",
    "seed",
    "bf16",
    "save_steps",
    "eval_steps",
    "metric_for_best_model",
    "world_size",
)
