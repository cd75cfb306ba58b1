"""The documentation builds cleanly (``mkdocs build --strict``) and every internal link of
the docs pages and the top-level Markdown files resolves, anchors included."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TOP_LEVEL = [REPO / "README.md", REPO / "RESULTS.md"]

FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", flags=re.M)


def _prose(path: Path) -> str:
    """The file without fenced code blocks, indented code and inline code."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return INLINE_CODE.sub("", text)


def _anchors(path: Path) -> set[str]:
    return {slugify(h, "-") for h in HEADING.findall(_prose(path))}


def _internal_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_mkdocs_build_is_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "math" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = [next(iter(item.values())) if isinstance(item, dict) else item
              for item in config["nav"]]
    assert sorted(listed) == sorted(p.name for p in PAGES)


@pytest.mark.parametrize("path", PAGES + TOP_LEVEL, ids=lambda p: p.relative_to(REPO).as_posix())
def test_internal_links_resolve(path):
    broken = []
    for target in _internal_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert broken == [], f"{path.name}: broken links {broken}"


def test_the_link_checker_sees_links_and_anchors():
    """The checker itself: a known link and a known anchor are found."""
    assert "docs/math.md#cross-fitting" in _internal_links(REPO / "README.md")
    assert "cross-fitting" in _anchors(DOCS / "math.md")
    assert "soft-md-lsm" in _anchors(DOCS / "math.md")


def test_readme_stays_short_and_nothing_cites_the_design_file():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    for path in PAGES + TOP_LEVEL:
        assert "DESIGN §" not in path.read_text(), f"{path.name} cites DESIGN; cite docs/ instead"
