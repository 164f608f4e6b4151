"""The S3 client of ``S3Storage``: built from s3fs-style options, and its errors translated.

boto3 is imported here only, lazily, so ckptkit imports without it; every client error the
backend can meet becomes the builtin error the store understands (``FileNotFoundError``,
``PermissionError``, ``OSError`` with an errno), naming the URL and the S3 error code.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import importlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

INSTALL_HINT = "pip install 'ckptkit-ml[s3]' (from a clone: pip install '.[s3]')"
STREAM_CHUNK = 8 << 20
#: The storage options understood, named as s3fs names them (pandas, Lightning, HF datasets).
STORAGE_OPTIONS = (
    "anon",
    "client_kwargs",
    "config_kwargs",
    "endpoint_url",
    "key",
    "profile",
    "secret",
    "token",
)
# 412: the condition failed; 409: a concurrent conditional write to the same key won.
CONFLICT_STATUSES = (409, 412)


def client_from_options(options: dict[str, Any], max_concurrency: int) -> Any:
    try:
        boto3 = importlib.import_module("boto3")
        botocore = importlib.import_module("botocore")
        config = importlib.import_module("botocore.config")
    except ImportError as e:
        raise ImportError(f"s3:// stores need boto3; run `{INSTALL_HINT}`") from e
    unknown = sorted(set(options) - set(STORAGE_OPTIONS))
    if unknown:
        raise TypeError(
            f"storage option(s) {', '.join(unknown)} are not used by ckptkit's S3 storage; "
            f"it understands {', '.join(STORAGE_OPTIONS)}"
        )
    # Anything not given falls back to what botocore reads itself: AWS_ACCESS_KEY_ID,
    # AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws/config, instance roles...
    session = boto3.session.Session(
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"),
        profile_name=options.get("profile"),
    )
    config_kwargs = {"max_pool_connections": max(10, 2 * max_concurrency)}
    config_kwargs.update(options.get("config_kwargs") or {})
    if options.get("anon"):
        config_kwargs["signature_version"] = botocore.UNSIGNED
    client_kwargs = dict(options.get("client_kwargs") or {})
    if options.get("endpoint_url") is not None:
        client_kwargs.setdefault("endpoint_url", options["endpoint_url"])
    return session.client("s3", config=config.Config(**config_kwargs), **client_kwargs)


def error_parts(e: BaseException) -> tuple[str, int] | None:
    """(S3 error code, HTTP status) of a botocore error; status 0 when no response came."""
    module = type(e).__module__
    if not module.startswith("botocore"):
        return None
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return type(e).__name__, 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code, status


def is_missing(parts: tuple[str, int] | None) -> bool:
    return parts is not None and (parts[1] == 404 or parts[0] in ("NoSuchKey", "NotFound"))


def as_oserror(e: BaseException, url: str) -> OSError | None:
    """The builtin error the store understands for a client error, or None if not one."""
    parts = error_parts(e)
    if parts is None:
        return None
    code, status = parts
    if code == "NoSuchBucket":
        return FileNotFoundError(errno.ENOENT, f"{url}: the bucket does not exist (S3 {code})")
    if is_missing(parts):
        return FileNotFoundError(errno.ENOENT, f"{url}: no such object (S3 {code or status})")
    if code in ("NoCredentialsError", "PartialCredentialsError"):
        return PermissionError(
            errno.EACCES,
            f"{url}: no AWS credentials were found ({code}); pass storage_options="
            "{'key': ..., 'secret': ...} (or {'profile': ...}, or {'anon': True} for a public "
            "bucket), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
            "in the environment",
        )
    if status == 403 or code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId"):
        return PermissionError(errno.EACCES, f"{url}: access denied (S3 {code or status})")
    if status == 0:
        return OSError(errno.EIO, f"{url}: the S3 request failed ({code}: {e})")
    return OSError(errno.EIO, f"{url}: S3 error {code} (HTTP {status}): {e}")


@contextlib.contextmanager
def translated(url: str) -> Iterator[None]:
    """Raise client errors as FileNotFoundError, PermissionError or OSError naming ``url``."""
    try:
        yield
    except Exception as e:
        err = as_oserror(e, url)
        if err is None:
            raise
        raise err from e


def read_into(body: Any, view: memoryview) -> int:
    """Fill ``view`` from a response body; the count read (short if the body ends first)."""
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def server_time(response: dict[str, Any]) -> datetime | None:
    """The server's clock from a response's Date header (None if it sent none)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date) if date else None
