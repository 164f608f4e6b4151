"""Griffe extension for the API reference (mkdocs.yml, plugin mkdocstrings): not part of the site.

Two things the reference needs that griffe cannot know by itself:

- ``ckptkit.adapters`` is installed from the ``adapters/`` folder (setuptools ``package-dir``), so
  static analysis of ``ckptkit/`` does not find it. The folder is loaded here and attached as the
  ``adapters`` member of ``ckptkit``: its objects get their public paths
  (``ckptkit.adapters.torch.TorchState``) and nothing is imported (TensorFlow need not be
  installed to document ``ckptkit.adapters.keras``).
- The docstrings use Sphinx roles (``:class:`~ckptkit.Checkpointer```). They become Markdown:
  a cross-reference for a public ``ckptkit.`` path, inline code otherwise. And their
  ``Example:`` sections are read as griffe's ``Examples:``, so ``>>>`` lines render as code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def _public(path: str) -> bool:
    parts = path.split(".")
    return parts[0] == "ckptkit" and not any(p.startswith("_") for p in parts)


def _markdown(match: re.Match[str]) -> str:
    role, short, target = match.groups()
    label = target.rsplit(".", 1)[-1] if short else target
    if role in ("meth", "func"):
        label += "()"
    if _public(target):
        return f"[`{label}`][{target}]"
    return f"`{label}`"


class CkptkitReference(griffe.Extension):
    """Attach ``adapters/`` as ``ckptkit.adapters``; turn Sphinx roles into Markdown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "ckptkit" or "adapters" in pkg.members or pkg.filepath is None:
            return
        folder = Path(str(pkg.filepath)).parent.parent / "adapters"
        if (folder / "__init__.py").exists():
            adapters = loader.load(folder, submodules=True)
            assert isinstance(adapters, griffe.Module)
            pkg.set_member("adapters", adapters)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_markdown, text)
