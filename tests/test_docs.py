"""Every ```python block in README.md and docs/ runs, one test per file, blocks in order.

The blocks of one file share a namespace, so a tutorial can build up step by step. A block right
after an ``<!-- skip-test -->`` comment is not run. Each file runs in a fresh empty directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP_MARKER = "<!-- skip-test -->"
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced python block: its first code line (1-based) and its source."""

    line: int
    source: str


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text that are not marked to be skipped.

    Fences of other languages are tracked too, so a python fence shown inside a longer
    ````markdown fence is not mistaken for a real one.
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    previous = ""  # the last non-blank line outside any fence
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence = match["fence"]
        language = match["info"].strip().split(" ")[0].lower()
        body_start = i + 1
        i = body_start
        while i < len(lines) and not _closes(lines[i], fence):
            i += 1
        if language == "python" and previous != SKIP_MARKER:
            blocks.append(Block(body_start + 1, "\n".join(lines[body_start:i]) + "\n"))
        previous = ""
        i += 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    indent = len(line) - len(line.lstrip(" "))
    stripped = line.strip()
    return indent <= 3 and len(stripped) >= len(fence) and stripped == fence[0] * len(stripped)


def doc_files() -> list[Path]:
    """README.md and every markdown file under docs/, in a stable order."""
    files = [REPO / "README.md"] if (REPO / "README.md").exists() else []
    return files + sorted((REPO / "docs").rglob("*.md"))


def run_blocks(path: Path, blocks: list[Block]) -> None:
    """Execute ``blocks`` in order in one namespace, naming the failing block's line."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        # Leading newlines make tracebacks point at the block's lines in the markdown file.
        code = compile("\n" * (block.line - 1) + block.source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            raise AssertionError(
                f"the python block at {rel}:{block.line} raised {type(exc).__name__}: {exc}"
            ) from exc


@pytest.mark.parametrize(
    "path", doc_files(), ids=lambda p: str(p.relative_to(REPO)) if isinstance(p, Path) else p
)
def test_doc_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of the file runs without error, in order, in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    run_blocks(path, python_blocks(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", ["README.md", "docs/quickstart.md"])
def test_tutorials_have_python_blocks(name: str) -> None:
    """The README and the quickstart each have at least one python block under test."""
    path = REPO / name
    assert path.exists(), f"{name} is missing"
    assert python_blocks(path.read_text(encoding="utf-8")), f"no python block found in {name}"


def test_python_blocks_finds_blocks_with_their_lines() -> None:
    """Python blocks are found with the line number of their first code line; others ignored."""
    text = "# Title\n\n```python\nx = 1\n```\n\n```bash\necho hi\n```\n\n```python\ny = x\n```\n"
    assert python_blocks(text) == [Block(4, "x = 1\n"), Block(12, "y = x\n")]


def test_python_blocks_honours_skip_marker() -> None:
    """A block right after the skip marker is left out; the next one is not."""
    text = f"{SKIP_MARKER}\n\n```python\nraise SystemExit\n```\n\n```python\nok = True\n```\n"
    assert python_blocks(text) == [Block(8, "ok = True\n")]


def test_python_blocks_ignores_fences_nested_in_longer_fences() -> None:
    """A python fence shown inside a four-backtick markdown fence is not a block."""
    text = "````markdown\n```python\nraise SystemExit\n```\n````\n"
    assert python_blocks(text) == []


def test_run_blocks_shares_namespace_and_reports_line(tmp_path: Path) -> None:
    """Later blocks see earlier names, and a failing block is named by file and line."""
    doc = tmp_path / "doc.md"
    doc.write_text("```python\na = 2\n```\n```python\nassert a == 3\n```\n", encoding="utf-8")
    blocks = python_blocks(doc.read_text(encoding="utf-8"))
    with pytest.raises(AssertionError, match=r"doc\.md:5 raised AssertionError"):
        run_blocks(doc, blocks)
    run_blocks(doc, blocks[:1])
