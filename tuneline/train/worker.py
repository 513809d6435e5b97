"""The entry point of one launched training worker: `accelerate launch -m tuneline.train.worker REQUEST`.

Every rank trains on the request's inputs; the main rank writes the stage (tuneline/train/launch.py
starts the workers and waits for them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneline.train.launch import LaunchRequest
from tuneline.train.stage import train_here


def main(argv: list[str]) -> None:
    """Train on the request file's inputs (`argv[0]`)."""
    request = LaunchRequest.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    train_here(
        request.artifacts_dir,
        request.splits,
        request.model,
        request.train,
        digest=request.digest,
        tracking=request.tracking,
        echo=print,  # the launcher streams each worker's output to the caller
    )


if __name__ == "__main__":
    main(sys.argv[1:])
