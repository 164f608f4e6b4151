"""``python -m ckptkit``: the ``ckptkit`` command line (see ``ckptkit._cli``)."""

from __future__ import annotations

from ckptkit._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
