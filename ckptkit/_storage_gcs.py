"""A store in a Google Cloud Storage bucket, committed by generation preconditions.

Layout under ``gs://bucket/prefix``: ``manifest.json``, and each checkpoint's files under
``step_<12 digits>.<18 random digits>/``. There is no lock; the commit protocol is:

1. Upload the checkpoint's files under a fresh name that no manifest lists, each with
   ``ifGenerationMatch=0`` (create-only, so even a name collision fails instead of
   overwriting). A file larger than one chunk goes up as a resumable upload, chunk by chunk.
2. Upload ``manifest.json`` in one request with ``ifGenerationMatch=<the generation read>``
   (``0`` when there was no manifest): the commit point. GCS applies it only if nobody
   committed since; the loser gets 412 and raises :class:`ManifestConflict`, and its files
   stay for its retry.
3. Delete what retention dropped.

A crashed writer leaves unlisted ``step_*`` prefixes (an unfinished resumable upload leaves
no object and expires on its own). Without a lock a live writer's files are unlisted too, so
:meth:`GCSStorage.sweep` removes only what is older than ``orphan_grace`` by the server's
clock. docs/object-store-design-gcs.md has what was measured.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from ckptkit._manifest import CHECKPOINT_DIR, MANIFEST_NAME, is_checkpoint_file
from ckptkit._storage import (
    CheckpointFiles,
    CheckpointWriter,
    ManifestConflict,
    ManifestVersion,
    Storage,
    UnsafeFileError,
)
from ckptkit._storage_gcs_client import (
    ServerClock,
    as_oserror,
    client_from_options,
    status_of,
    translated,
)
from ckptkit._storage_gcs_io import (
    CappedWriter,
    GCSCheckpointFiles,
    GCSCheckpointWriter,
    plain_name,
)

logger = logging.getLogger("ckptkit")

#: A resumable upload's chunks, all but the last, are a multiple of this many bytes.
CHUNK_MULTIPLE = 256 << 10
# 412: the generation precondition failed; 409: a concurrent request on the object won.
_CONFLICT_STATUSES = (409, 412)


class GCSStorage(Storage):
    """A store under ``gs://bucket/prefix``, committed with generation preconditions.

    Two writers never both commit: each commit is one upload conditional on the generation of
    the manifest the writer read, and the loser raises :class:`ManifestConflict`. A large file
    goes up as a resumable upload, one chunk sent while the next fills, so a file is never
    whole in memory; files come back in parallel ranged reads pinned to one generation.

    Args:
        url: ``gs://bucket`` or ``gs://bucket/prefix``.
        storage_options: as for gcsfs (and so pandas, Lightning, HF datasets): ``project``,
            ``token`` (``"anon"``, ``"google_default"``, ``"cloud"``, a path to a service-account
            JSON file, its dict, or a google.auth credentials object) and ``endpoint_url``.
            What is not given comes from the environment as google-auth and
            google-cloud-storage read it (``GOOGLE_APPLICATION_CREDENTIALS``,
            ``STORAGE_EMULATOR_HOST``...).
        chunk_size: bytes per chunk of a resumable upload (a multiple of 256 KiB) and per
            ranged read; a file no larger than this goes up in one request. Writing one file
            holds about five chunks in memory.
        max_concurrency: ranged reads (and deletes) in flight at once for one file.
        orphan_grace: seconds an unlisted checkpoint must have been left untouched, by the
            server's clock, before :meth:`sweep` removes it. It must exceed the longest save,
            from its first upload to its commit.
        client: a ``google.cloud.storage.Client`` to use instead of one built from
            ``storage_options``.

    Raises:
        ImportError: google-cloud-storage is not installed (the message gives the pip command).

    Example::

        storage = GCSStorage(
            "gs://my-bucket/runs/exp1",
            storage_options={"endpoint_url": "http://127.0.0.1:4443", "token": "anon"},
        )
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        chunk_size: int = 16 << 20,
        max_concurrency: int = 8,
        orphan_grace: float = 6 * 3600,
        client: Any = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "gs" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not a gs://bucket/prefix URL")
        if chunk_size < CHUNK_MULTIPLE or chunk_size % CHUNK_MULTIPLE:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of {CHUNK_MULTIPLE}")
        if max_concurrency < 1 or orphan_grace < 0:
            raise ValueError("max_concurrency must be at least 1 and orphan_grace at least 0")
        self.bucket_name = parts.netloc
        self.prefix = parts.path.strip("/")
        self.location = f"gs://{self.bucket_name}/{self.prefix}".rstrip("/")
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.orphan_grace = orphan_grace
        self.client = client or client_from_options(storage_options or {})
        self.bucket = self.client.bucket(self.bucket_name)
        self._clock = ServerClock(self.client)

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts]) if self.prefix else "/".join(parts)

    def url_of(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    # -- the store as a whole ------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the bucket exists (a prefix needs no creating)."""
        with translated(f"gs://{self.bucket_name}"):
            return bool(self.bucket.exists())

    def create(self) -> None:
        """Nothing: a prefix exists once an object is under it (buckets are made elsewhere)."""

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        """A context that does nothing: GCS has no lock.

        The generation precondition of :meth:`commit_manifest` is the guard: of two writers
        that read the same manifest, one commits and the other gets :class:`ManifestConflict`.
        """
        return contextlib.nullcontext()

    def lock_description(self) -> str:
        return "nothing (GCS stores commit conditionally instead of locking)"

    # -- the manifest --------------------------------------------------------------------------

    def read_manifest(self, cap: int) -> ManifestVersion:
        """The manifest and its generation, in one GET; ``ValueError`` once past ``cap`` bytes."""
        key = self.key(MANIFEST_NAME)
        blob = self.bucket.blob(key)
        out = CappedWriter(cap)
        try:
            blob.download_to_file(out, raw_download=True)
        except Exception as e:
            if status_of(e) == 404:
                if not self.exists():
                    raise FileNotFoundError(
                        errno.ENOENT, f"{self.url_of(key)}: the bucket does not exist"
                    ) from e
                return ManifestVersion(None, None)
            err = as_oserror(e, self.url_of(key))
            if err is None:
                raise
            raise err from e
        if blob.generation is None:
            raise OSError(errno.EIO, f"{self.url_of(key)}: GCS sent no generation with it")
        return ManifestVersion(bytes(out.data), int(blob.generation))

    def commit_manifest(
        self, data: bytes, *, expected: ManifestVersion, new_checkpoint: str | None = None
    ) -> None:
        """One upload with ``ifGenerationMatch`` of ``expected``: the commit point.

        A lost race (412, or 409) raises :class:`ManifestConflict` and leaves
        ``new_checkpoint`` for the retry. A refusal (access denied, no such bucket) deletes
        ``new_checkpoint`` and raises ``OSError``. When the outcome is unknown (a 5xx, a lost
        connection, after the client's own retries) the manifest is read back: if it holds
        ``data`` the commit happened (a retried upload sees its own first try as a conflict);
        if not, ``new_checkpoint`` is left for the sweep, since the first try may still land,
        and ``OSError`` is raised.
        """
        key = self.key(MANIFEST_NAME)
        url = self.url_of(key)
        if expected.data is None:
            generation = 0
        elif isinstance(expected.token, int):
            generation = expected.token
        else:
            raise ValueError(f"{url}: expected manifest has no generation to commit against")
        try:
            self.bucket.blob(key).upload_from_string(
                data, content_type="application/json", if_generation_match=generation
            )
            return
        except Exception as e:
            status = status_of(e)
            err = as_oserror(e, url)
            if status is None or err is None:
                raise
            conflict = status in _CONFLICT_STATUSES
            known = conflict or 400 <= status < 500
            if not known or conflict:
                with contextlib.suppress(Exception):
                    if self.read_manifest(len(data)).data == data:
                        logger.info("%s: committed, though GCS answered %s", url, status)
                        return
            if conflict:
                raise ManifestConflict(
                    f"{url}: another writer committed since it was read (GCS {status})"
                ) from e
            if known and new_checkpoint is not None:
                self.delete_keys(self.list_keys(self.key(new_checkpoint) + "/"))
            elif new_checkpoint is not None:
                err = OSError(
                    err.errno,
                    f"{err.strerror}; the commit may still land, so {new_checkpoint} is left "
                    "for a later sweep",
                )
            raise err from e

    # -- checkpoints -------------------------------------------------------------------------

    def new_checkpoint(self, step: int) -> CheckpointWriter:
        """A writer under ``step_<12 digits>.<18 random digits>``: no rename, no collision."""
        name = f"step_{step:012d}.{secrets.randbelow(10**18):018d}"
        if not CHECKPOINT_DIR.fullmatch(name):
            raise ValueError(f"step {step} does not make a checkpoint name")
        return GCSCheckpointWriter(self, name)

    def join_checkpoint(self, name: str) -> CheckpointWriter:
        if not CHECKPOINT_DIR.fullmatch(name):
            raise ValueError(f"{name!r} is not the name of a checkpoint being written")
        return GCSCheckpointWriter(self, name, joined=True)

    def open_checkpoint(self, directory: str) -> CheckpointFiles:
        """Open a checkpoint after one listing says something is under its prefix."""
        if not CHECKPOINT_DIR.fullmatch(directory):
            raise UnsafeFileError(f"{directory!r} is not a checkpoint name")
        prefix = self.key(directory) + "/"
        with translated(self.url_of(prefix)):
            found = list(self.client.list_blobs(self.bucket_name, prefix=prefix, max_results=1))
        if not found:
            raise FileNotFoundError(
                errno.ENOENT, f"{self.url_of(prefix)}: no object under this checkpoint's prefix"
            )
        return GCSCheckpointFiles(self, directory)

    def delete_checkpoint(self, directory: str, names: Iterator[str] | list[str]) -> None:
        """Delete exactly the named objects of the checkpoint."""
        self.delete_keys(self.key(directory, plain_name(n)) for n in names)

    def sweep(self, listed: set[str] | None) -> None:
        """Remove unlisted checkpoints older than ``orphan_grace`` by the server's clock.

        Age is judged against the Date of the listing's response, so a skewed local clock
        cannot make a live writer's files look abandoned. Checkpoints are touched only when a
        manifest lists what exists (``listed`` is not None), and within one only the store's
        own file names are deleted. Unfinished resumable uploads need no sweeping: they are
        not objects, cannot be listed, and GCS expires them after a week.
        """
        if listed is None:
            return
        root = self.key("")
        newest: dict[str, datetime] = {}
        own: dict[str, list[str]] = {}
        with translated(self.url_of(root)):
            self._clock.reset()
            blobs = list(self.client.list_blobs(self.bucket_name, prefix=root))
            now = self._clock.now()
        for blob in blobs:
            directory, _, name = blob.name[len(root) :].partition("/")
            if not CHECKPOINT_DIR.fullmatch(directory) or directory in listed:
                continue
            modified: datetime = max(blob.updated, blob.time_created)
            newest[directory] = max(modified, newest.get(directory, modified))
            if is_checkpoint_file(name):
                own.setdefault(directory, []).append(blob.name)
        if now is None and own:
            logger.warning("%s: no server time to judge leftovers by; not sweeping", self)
            return
        for directory, keys in own.items():
            if now is not None and (now - newest[directory]).total_seconds() >= self.orphan_grace:
                logger.info("%s: removing %s, which the manifest does not list", self, directory)
                self.delete_keys(keys)

    # -- object helpers (the writer, reader and sweep share them) -------------------------------

    def list_keys(self, prefix: str) -> list[str]:
        with translated(self.url_of(prefix)):
            return [b.name for b in self.client.list_blobs(self.bucket_name, prefix=prefix)]

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete exactly ``keys`` (missing ones are no error), a few requests at a time."""
        keys = list(keys)
        if len(keys) <= 1:
            for key in keys:
                self._delete_one(key)
            return
        with ThreadPoolExecutor(min(self.max_concurrency, len(keys)), "ckptkit-gcs-rm") as pool:
            for done in pool.map(self._delete_one, keys):
                del done

    def _delete_one(self, key: str) -> None:
        try:
            self.bucket.blob(key).delete()
        except Exception as e:
            if status_of(e) == 404:
                return
            err = as_oserror(e, self.url_of(key))
            if err is None:
                raise
            raise OSError(err.errno, f"{err.strerror} (not deleted)") from e

    def __repr__(self) -> str:
        return f"GCSStorage({self.location!r})"
