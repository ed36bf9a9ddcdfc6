"""A real S3 API on loopback (moto's server mode) for the object-storage tests.

The server runs in a thread of the test process; everything else talks to it
over HTTP exactly as to any S3-compatible server: ``pyarrow.fs.S3FileSystem``
in this process, and CLI subprocesses (with their Ray workers) that find the
endpoint and credentials in their environment.
"""

from __future__ import annotations

import uuid


class LoopbackS3:
    """moto's ThreadedMotoServer on 127.0.0.1 and a free port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        """What a client process needs, and nothing that points at a real cloud."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "actclust-test",
            "AWS_SECRET_ACCESS_KEY": "actclust-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint, access_key="actclust-test",
                               secret_key="actclust-test-secret", region="us-east-1",
                               allow_bucket_creation=True)

    def new_bucket(self) -> str:
        """A fresh, empty bucket; returns its name."""
        name = f"actclust-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``bucket/prefix`` (as ``bucket/key``), sorted."""
        from pyarrow import fs

        infos = self.filesystem().get_file_info(fs.FileSelector(prefix, recursive=True,
                                                                allow_not_found=True))
        return sorted(i.path for i in infos if i.type == fs.FileType.File)

    def stop(self) -> None:
        self.server.stop()
