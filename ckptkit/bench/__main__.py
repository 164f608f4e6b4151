"""``python -m ckptkit.bench``: see ``ckptkit.bench._cli``."""

from __future__ import annotations

from ckptkit.bench._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
