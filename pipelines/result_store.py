"""Prefect result storage on S3 through the project's storage layer (boto3 and the standard AWS
configuration, AWS_ENDPOINT_URL included), so flow workers share task results and cache records
without Prefect's s3fs-based RemoteFileSystem, which this environment does not install."""

from __future__ import annotations

from typing import Any

from prefect.filesystems import WritableFileSystem

from data_prep import storage


class ObjectStoreFileSystem(WritableFileSystem):
    """Task results under `basepath` (s3://bucket/prefix or a local folder); writes are atomic."""

    _block_type_name = "ldmflow object store"
    basepath: str

    def _uri(self, path: str) -> str:
        return path if path.startswith(self.basepath) else storage.join(self.basepath, path)

    def read_path(self, path: str, **_: Any) -> bytes:
        uri = self._uri(path)
        return storage.storage_for(uri).read_bytes(uri)

    def write_path(self, path: str, content: bytes, **_: Any) -> str:
        uri = self._uri(path)
        storage.storage_for(uri).put_bytes(uri, content)
        return uri

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)
