"""One store per test on each storage backend, with what tests need to look underneath it."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ckptkit import CheckpointStore
from ckptkit._manifest import CHECKPOINT_DIR


class Backend:
    """A fresh, empty store location on one backend."""

    name: str
    root: str
    options: dict[str, Any] | None = None

    def store(self, **kwargs: Any) -> CheckpointStore:
        if self.options is not None:
            kwargs["storage_options"] = self.options
        return CheckpointStore(self.root, **kwargs)

    def checkpoint_names(self) -> list[str]:
        """The checkpoints present on the medium, listed or not."""
        raise NotImplementedError

    def corrupt(self, directory: str, name: str) -> None:
        """Flip one byte in the middle of a checkpoint's file, keeping its size."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class LocalBackend(Backend):
    name = "local"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = str(path)

    def checkpoint_names(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if CHECKPOINT_DIR.fullmatch(p.name))

    def corrupt(self, directory: str, name: str) -> None:
        path = self.path / directory / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self) -> None:
        self.root = f"memory://test-{secrets.token_hex(6)}"

    def _storage(self) -> Any:
        return self.store()._storage

    def checkpoint_names(self) -> list[str]:
        return sorted(self._storage().root.checkpoints)

    def corrupt(self, directory: str, name: str) -> None:
        files = self._storage().root.checkpoints[directory]
        data = bytearray(files[name])
        data[len(data) // 2] ^= 0xFF
        files[name] = bytes(data)


class S3Backend(Backend):
    name = "s3"

    def __init__(self, bucket: Any) -> None:
        self.bucket = bucket
        self.root = bucket.url("store")
        self.options = bucket.options

    def checkpoint_names(self) -> list[str]:
        names = set()
        pages = self.bucket.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket.name, Prefix="store/"):
            for item in page.get("Contents", []):
                first = item["Key"].removeprefix("store/").split("/")[0]
                if CHECKPOINT_DIR.fullmatch(first):
                    names.add(first)
        return sorted(names)

    def corrupt(self, directory: str, name: str) -> None:
        key = f"store/{directory}/{name}"
        client = self.bucket.client
        data = bytearray(client.get_object(Bucket=self.bucket.name, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=self.bucket.name, Key=key, Body=bytes(data))


class GCSBackend(Backend):
    name = "gcs"

    def __init__(self, bucket: Any) -> None:
        self.bucket = bucket
        self.root = bucket.url("store")
        self.options = bucket.options

    def checkpoint_names(self) -> list[str]:
        names = {key.removeprefix("store/").split("/")[0] for key in self.bucket.keys("store/")}
        return sorted(n for n in names if CHECKPOINT_DIR.fullmatch(n))

    def corrupt(self, directory: str, name: str) -> None:
        blob = self.bucket.client.bucket(self.bucket.name).blob(f"store/{directory}/{name}")
        data = bytearray(blob.download_as_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.upload_from_string(bytes(data))
