"""Benchmark: the quickstart with its artifacts on S3 and MLflow + Prefect on PostgreSQL, against
the quickstart on the embedded defaults (local folder, SQLite), in the same script.

Starts a throwaway PostgreSQL cluster (Debian's binaries, as tests/postgres_server.py) and moto's
S3 server on loopback, then runs `tuneline run recipes/quickstart.yaml` three times:

  local      artifacts in a fresh local folder, MLflow and Prefect on SQLite: the baseline
  machine a  artifacts_dir s3://BUCKET/quickstart (local_dir a), register.tracking_uri on
             PostgreSQL, the Prefect server on PostgreSQL (PREFECT_SERVER_DATABASE_CONNECTION_URL)
  machine b  the same recipe from another local_dir: every stage comes from the store

Prints each run's wall time and ratio to the local run, its base -> tuned line, what the bucket
holds (committed stages, MLflow artifacts), the registered versions and alias in PostgreSQL and
the flow runs in Prefect's PostgreSQL database. Usage (from the project folder):

    python bench/quickstart_at_scale.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(label: str, overrides: list[str], env: dict[str, str]) -> float:
    """`tuneline run recipes/quickstart.yaml OVERRIDES`; its wall time, its report's summary lines."""
    started = time.perf_counter()
    result = subprocess.run(
        ["tuneline", "run", "recipes/quickstart.yaml", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(
            f"{label}: tuneline run failed ({result.returncode})\n"
            + result.stdout[-3000:]
            + result.stderr[-3000:]
        )
    lines = [line.strip() for line in result.stdout.splitlines()]
    summary = [
        line for line in lines if any(word in line.lower() for word in ("tuned", "reused", "models:/"))
    ]
    print(f"{label}: {seconds:.1f} s")
    for line in summary[:6]:
        print(f"    {line}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the runs (default: a temp folder)"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tuneline-scale-"))

    from moto.server import ThreadedMotoServer
    from postgres_server import postgres_server

    from tuneline.cli.main import QUICKSTART_DATA, QUICKSTART_MODEL, make_tiny_model_command

    if not (ROOT / QUICKSTART_MODEL / "config.json").is_file():
        os.chdir(ROOT)
        make_tiny_model_command(QUICKSTART_MODEL, QUICKSTART_DATA)
    try:
        database = postgres_server()
        postgres = database.__enter__()
    except BaseException as error:  # pytest.skip's exception when PostgreSQL is not installed
        sys.exit(f"PostgreSQL is needed: {error}")
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    try:
        host, port = s3.get_host_and_port()
        aws = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import boto3

        client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], **_credentials(aws))
        client.create_bucket(Bucket="tuneline-bench")
        mlflow_url = postgres.create_database("mlflow")
        postgres.create_database("prefect")
        base_env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}

        local = run("local (folder + SQLite)", [f"artifacts_dir={work / 'local'}"], base_env)
        scaled_env = {
            **base_env,
            **aws,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url("prefect", driver="asyncpg"),
        }
        scaled = [
            "artifacts_dir=s3://tuneline-bench/quickstart",
            f"register.tracking_uri={mlflow_url}",
        ]
        first = run("machine a (S3 + PostgreSQL)", [*scaled, f"local_dir={work / 'a'}"], scaled_env)
        second = run("machine b (S3 + PostgreSQL)", [*scaled, f"local_dir={work / 'b'}"], scaled_env)
        print(f"ratio machine a / local: {first / local:.2f}; machine b / local: {second / local:.2f}")

        keys = [
            item["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="tuneline-bench")
            for item in page.get("Contents", [])
        ]
        stages = sorted(
            {key.split("/")[2] for key in keys if key.endswith("/manifest.json") and "/stages/" in key}
        )
        print(f"bucket: {len(keys)} objects; committed stages: {', '.join(stages)}")
        print(f"bucket: MLflow artifacts: {sum('/mlartifacts/' in key for key in keys)} objects")
        versions = postgres.query(
            "mlflow", "SELECT name, version, source FROM model_versions ORDER BY version"
        )
        aliases = postgres.query("mlflow", "SELECT name, alias, version FROM registered_model_aliases")
        print(f"PostgreSQL mlflow: versions {[(n, v) for n, v, _ in versions]}, aliases {aliases}")
        print(f"PostgreSQL mlflow: version sources {[source for *_, source in versions]}")
        runs = postgres.query("prefect", "SELECT name, state_type FROM flow_run ORDER BY created")
        print(f"PostgreSQL prefect: {len(runs)} flow runs {[state for _, state in runs]}")
    finally:
        from tuneline.flows.server import stop_server

        for folder in ("local", "a", "b"):  # each run's local Prefect server
            stop_server(work / folder / "prefect")
        s3.stop()
        database.__exit__(None, None, None)


def _credentials(aws: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
    }


if __name__ == "__main__":
    main()
