"""A real S3 protocol server on loopback for the tests: moto's server mode (what s3fs's own test
suite runs), on 127.0.0.1 with an OS-chosen port, and the environment that points s3fs, boto3 and
MLflow at it (AWS_ENDPOINT_URL and test credentials), restored when the session ends."""

import os
import uuid
from dataclasses import dataclass

import pytest

ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "tuneline-test",
    "AWS_SECRET_ACCESS_KEY": "tuneline-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str

    def bucket(self) -> str:
        """A new empty bucket; returns its name."""
        import boto3

        name = f"tuneline-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in a thread of the test process; every process the tests start reaches it
    through the inherited environment."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[dev]'")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in [*ENVIRONMENT, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENVIRONMENT, AWS_ENDPOINT_URL=endpoint)
    try:
        yield S3Server(endpoint)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
