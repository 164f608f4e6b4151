"""Write the golden store of the current format version: ``tests/data/format_v<N>/``.

Run ``python tests/data/make_golden.py`` from the repository root once, when a format version
is introduced, and commit the directory it writes. Golden stores are only ever added, never
edited: this script refuses to touch a directory that exists. The checkpoints it saves come from
``GOLDEN_BUILDERS`` in ``tests/test_format.py``, which the tests rebuild and compare against.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
REPO = DATA_DIR.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ckptkit._manifest import FORMAT_VERSION  # noqa: E402  (needs REPO on sys.path)
from ckptkit._store import LOCK_NAME  # noqa: E402
from tests.test_format import GOLDEN_BUILDERS  # noqa: E402


def main(data_dir: Path = DATA_DIR) -> Path:
    """Write ``data_dir/format_v<FORMAT_VERSION>`` and return its path.

    Raises:
        FileExistsError: the directory exists; golden files are only ever added.
        KeyError: no golden builder exists yet for the current format version.
    """
    target = data_dir / f"format_v{FORMAT_VERSION}"
    if target.exists():
        raise FileExistsError(
            f"{target} exists, and golden files are only ever added, never edited; a format "
            "change needs a new FORMAT_VERSION and a new directory"
        )
    if FORMAT_VERSION not in GOLDEN_BUILDERS:
        raise KeyError(
            f"tests/test_format.py has no golden builder for format_version {FORMAT_VERSION}; "
            "add one to GOLDEN_BUILDERS"
        )
    # Build beside the target and rename, so a failed run leaves no half-written golden store.
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=data_dir))
    try:
        work.chmod(0o755)  # mkdtemp makes it private to its owner
        GOLDEN_BUILDERS[FORMAT_VERSION](work)
        (work / LOCK_NAME).unlink(missing_ok=True)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


if __name__ == "__main__":
    try:
        print(main())
    except (FileExistsError, KeyError) as e:
        sys.exit(str(e))
