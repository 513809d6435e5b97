"""What a train stage folder holds, and how it shows in the Prefect UI.

No torch, transformers or MLflow here: a task that finds its train stage already finished shows
it from these files without importing the training stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOG_FILE = "train.log"
CURVE_FILE = "loss_curve.png"


def image_data_url(path: Path) -> str:
    """A PNG as a data URL: Prefect's image artifact shows it without a file server."""
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def training_markdown(stats: dict[str, Any], log_text: str, tail_lines: int = 40) -> str:
    """The train stage's summary and the end of its training log, as markdown for the Prefect UI."""
    rows = [
        ("steps", stats.get("steps")),
        ("resumed from step", stats.get("resumed_from_step")),
        ("train loss", stats.get("train_loss")),
        ("tokens/s", stats.get("tokens_per_second")),
        ("best checkpoint step", stats.get("best_checkpoint_step")),
        ("MLflow run", stats.get("mlflow_run_id")),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    tail = "\n".join(log_text.splitlines()[-tail_lines:])
    return f"## Training\n\n| | |\n|---|---|\n{table}\n\n### Training log (end)\n\n```\n{tail}\n```\n"
