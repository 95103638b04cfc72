"""The README stays a newcomer's page (under 450 lines, depth in docs/) and none of its links are dead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 450
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+)$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := _HEADING.match(line)):
            found.add(slug(match.group(1)))
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [target for target in _LINK.findall(text) if not target.startswith(("http://", "https://"))]


def test_slug_matches_github() -> None:
    assert slug("Calling it yourself: `make run ARGS=--serve`") == "calling-it-yourself-make-run-args--serve"
    assert slug("Operating it: `queuectl`") == "operating-it-queuectl"


def test_the_readme_is_under_450_lines() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count < MAX_README_LINES, f"README.md has {count} lines: move depth into docs/"


DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_local_link_resolves(page: Path) -> None:
    """Every relative link (docs/..., ../README.md#..., #anchor) names a file that exists, and a heading."""
    targets = links(page)
    if page == README:
        assert any(t.startswith("docs/") for t in targets), "the README links no docs/ page"
    for target in targets:
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def test_the_moved_sections_live_in_docs() -> None:
    readme = README.read_text(encoding="utf-8")
    for page in ("docs/local.md", "docs/devstack.md", "docs/deploy.md", "docs/bench.md"):
        assert f"]({page}" in readme, f"the README does not link {page}"
    for gone in ("## The local stack", "## Dependencies", "### Rotate the client secret", "### Network"):
        assert gone not in readme
