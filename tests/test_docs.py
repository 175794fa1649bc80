"""Every Python block in README.md and docs/*.md runs, top to bottom, one namespace per file."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS_RAY = ("import ray", "TaskWrapper", "ActorWrapper", "ModelWrapper")


def _blocks(path: pathlib.Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(path, request):
    blocks = _blocks(path)
    if any(k in b for b in blocks for k in NEEDS_RAY):
        request.getfixturevalue("ray_session")
    ns: dict = {"__name__": f"doc_{path.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), ns)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name}, python block {i} failed: {exc!r}") from exc


def test_docs_have_examples():
    assert _blocks(ROOT / "docs" / "tasks.md"), "docs/tasks.md lost its examples"
