"""Check a built wheel: every package, py.typed, the console script, extras and dependencies.

Usage: ``python tests/helpers/check_wheel.py dist/ckptkit_ml-*.whl``. Exits non-zero naming
what is missing. Run by ``.ci/run`` after ``python -m build`` and ``twine check``.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

REQUIRED_FILES = (
    "ckptkit/__init__.py",
    "ckptkit/py.typed",
    "ckptkit/__main__.py",
    "ckptkit/_cli/__init__.py",
    "ckptkit/bench/__main__.py",
    "ckptkit/adapters/__init__.py",
    "ckptkit/adapters/torch.py",
    "ckptkit/adapters/keras.py",
)
REQUIRED_EXTRAS = ("torch", "keras", "dtypes", "plot", "progress")
REQUIRED_DEPENDENCIES = ("numpy", "filelock", "xxhash")


def problems(path: str) -> list[str]:
    found: list[str] = []
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        found += [f"missing {name}" for name in REQUIRED_FILES if name not in names]
        found += [f"test file shipped: {n}" for n in names if n.startswith("tests/")]
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            found.append("no LICENSE file in the wheel's .dist-info/licenses/")
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(info).decode("utf-8"))
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        if "ckptkit = ckptkit._cli:main" not in wheel.read(entry_points).decode("utf-8"):
            found.append("no `ckptkit` console script")
    extras = set(meta.get_all("Provides-Extra") or [])
    found += [f"missing extra {e}" for e in REQUIRED_EXTRAS if e not in extras]
    requires = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    unconditional = {
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires
    }
    found += [f"missing dependency {d}" for d in REQUIRED_DEPENDENCIES if d not in unconditional]
    return found


def main(paths: list[str]) -> int:
    bad = 0
    for path in paths:
        for problem in problems(path):
            print(f"{path}: {problem}", file=sys.stderr)
            bad += 1
        if not bad:
            print(f"{path}: packages, py.typed, console script, extras and dependencies present")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
