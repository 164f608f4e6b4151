"""Benchmarks of ckptkit against the disk, ``torch.save`` and safetensors.

Run ``python -m ckptkit.bench --help``. Every method is measured side by side on the same data,
alternating the order round by round, and compared as a ratio to a reference measured in the
same run: the raw ``write`` + ``fsync`` of the same bytes for saves, safetensors ``load_file`` for
loads. ``import ckptkit`` never imports this package; torch, safetensors and matplotlib are
optional here (a method whose library is missing is reported as "not installed").
"""

from __future__ import annotations

__all__: list[str] = []
