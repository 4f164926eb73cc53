"""A real S3 API for tests: moto's threaded server on loopback, with fake credentials.

Import the fixtures into a test module (``from s3server import s3_endpoint,
s3_bucket``) or into ``conftest.py`` to share them. Nothing here can reach AWS:
the server listens on 127.0.0.1 only, and ``s3_bucket`` points s3fs at it with
fake credentials, no profile, no config files and no instance metadata.
"""

from __future__ import annotations

import itertools
import os

import pytest

FAKE_ACCESS_KEY = "FAKEDIFFCOLORTESTKEY"
FAKE_SECRET_KEY = "diffcolor-fake-secret-never-shown"
_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server started once per session (a free port)."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, tmp_path):
    """``s3://NAME``: a fresh empty bucket on the moto server, the environment set to reach it.

    Sets fake AWS credentials and ``DIFFCOLOR_S3_ENDPOINT_URL`` for this test only,
    and clears s3fs's instance cache before and after, so that no filesystem
    built for another configuration is reused.
    """
    import s3fs

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DIFFCOLOR_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    name = f"diffcolor-test-{os.getpid()}-{next(_bucket_numbers)}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


def s3_client(endpoint: str):
    """A boto3 client of the moto server, to look at buckets behind storage's back."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=FAKE_ACCESS_KEY, aws_secret_access_key=FAKE_SECRET_KEY,
    )
