"""The GCS client behind ``GCSStorage``: built from storage options, its errors translated.

Everything that knows google-cloud-storage's own types lives here or in ``_storage_gcs.py``
behind ``Any``: the client is imported lazily, so ``import ckptkit`` never needs it.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import importlib
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

INSTALL_HINT = "pip install 'ckptkit-ml[gcs]' (from a clone: pip install '.[gcs]')"
#: The storage options understood, named as gcsfs names them (pandas, Lightning, HF datasets).
STORAGE_OPTIONS = ("endpoint_url", "project", "token")
#: What ``token`` may be besides a path, a dict of service-account info or a credentials object.
_TOKEN_WORDS = ("anon", "google_default", "cloud")
_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
# Modules whose exceptions are the client's answers (or its transport's failures).
_CLIENT_MODULES = ("google.", "requests.", "urllib3.")


def client_from_options(options: dict[str, Any]) -> Any:
    """A ``google.cloud.storage.Client`` for gcsfs-style ``options``; the environment fills gaps.

    ``token``: None or ``"google_default"`` (what google-auth finds: GOOGLE_APPLICATION_CREDENTIALS,
    gcloud's login, the metadata server), ``"anon"``, ``"cloud"`` (the metadata server), a path to
    a service-account or authorized-user JSON file, its parsed dict, or a credentials object.
    ``endpoint_url`` overrides STORAGE_EMULATOR_HOST (a private endpoint, or an emulator with
    ``token="anon"``); under STORAGE_EMULATOR_HOST with no token the client is anonymous, as
    google-cloud-storage makes it.
    """
    try:
        storage = importlib.import_module("google.cloud.storage")
        auth = importlib.import_module("google.auth")
        anonymous = importlib.import_module("google.auth.credentials").AnonymousCredentials
    except ImportError as e:
        raise ImportError(f"gs:// stores need google-cloud-storage; run `{INSTALL_HINT}`") from e
    unknown = sorted(set(options) - set(STORAGE_OPTIONS))
    if unknown:
        raise TypeError(
            f"storage option(s) {', '.join(unknown)} are not used by ckptkit's GCS storage; "
            f"it understands {', '.join(STORAGE_OPTIONS)}"
        )
    token = options.get("token")
    kwargs: dict[str, Any] = {}
    # Only a project given is passed: google-cloud-storage reads project=None as "no project".
    if options.get("project") is not None:
        kwargs["project"] = options["project"]
    if options.get("endpoint_url") is not None:
        kwargs["client_options"] = {"api_endpoint": options["endpoint_url"]}
    if token is None or token == "google_default":
        pass  # the client asks google.auth.default(), or goes anonymous for an emulator
    elif token == "anon":
        kwargs["credentials"] = anonymous()
        kwargs.setdefault("project", None)  # no project to look up
    elif token == "cloud":
        compute = importlib.import_module("google.auth.compute_engine")
        kwargs["credentials"] = compute.Credentials()
    elif isinstance(token, str):
        kwargs["credentials"], project = auth.load_credentials_from_file(token, scopes=_SCOPES)
        if project is not None:
            kwargs.setdefault("project", project)
    elif isinstance(token, dict):
        kwargs["credentials"], project = auth.load_credentials_from_dict(token, scopes=_SCOPES)
        if project is not None:
            kwargs.setdefault("project", project)
    elif hasattr(token, "before_request"):  # a google.auth credentials object
        kwargs["credentials"] = token
    else:
        raise ValueError(
            f"token {token!r} is not one ckptkit understands: {', '.join(_TOKEN_WORDS)}, "
            "a path to a credentials JSON file, its dict, or a google.auth credentials object"
        )
    return storage.Client(**kwargs)


class ServerClock:
    """The server's clock, from the Date header of the last response each thread received.

    The sweep judges age by the server's clock, as the S3 backend does, so that a skewed local
    clock cannot make a live writer's objects look abandoned. google-cloud-storage hands back
    no response headers from a listing, so a hook on the client's HTTP session records them.
    """

    def __init__(self, client: Any) -> None:
        self._last = threading.local()
        session = getattr(client, "_http", None)
        hooks: Any = getattr(session, "hooks", None)
        self.attached = isinstance(hooks, dict) and isinstance(hooks.get("response"), list)
        if self.attached:
            hooks["response"].append(self._record)

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self._last.date = response.headers.get("Date")
        return response

    def reset(self) -> None:
        self._last.date = None

    def now(self) -> datetime | None:
        """The Date of this thread's last response since :meth:`reset` (None if none came)."""
        date = getattr(self._last, "date", None)
        return email.utils.parsedate_to_datetime(date) if date else None


def status_of(e: BaseException) -> int | None:
    """The HTTP status of a client error; 0 when no response came; None if not a client error.

    google-cloud-storage raises ``google.api_core`` exceptions (``.code``) from most calls,
    but the resumable writer lets its media library's ``InvalidResponse`` (``.response``)
    through, and a lost connection is the transport's own error.
    """
    if not type(e).__module__.startswith(_CLIENT_MODULES):
        return None
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return code
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else 0


def as_oserror(e: BaseException, url: str) -> OSError | None:
    """The builtin error the store understands for a client error, or None if not one."""
    status = status_of(e)
    if status is None:
        return None
    if status == 404:
        return FileNotFoundError(errno.ENOENT, f"{url}: no such object or bucket (GCS 404)")
    if status in (401, 403):
        return PermissionError(errno.EACCES, f"{url}: access denied (GCS {status}): {e}")
    if status == 412:
        return FileExistsError(errno.EEXIST, f"{url}: exists already (GCS 412, create-only)")
    if status == 0:
        return OSError(errno.EIO, f"{url}: the GCS request failed ({type(e).__name__}: {e})")
    return OSError(errno.EIO, f"{url}: GCS error (HTTP {status}): {e}")


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
