"""The documentation holds together: the README stays a doorway, every link between the pages
resolves (file and heading), and the API reference builds from the public API's docstrings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import portside

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            anchors.add(_slug(line))
    return anchors


def test_the_readme_is_a_doorway() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert "scripts/test" in text and "portside echo" in text  # the two commands come first
    assert text.index("portside echo") < text.index("## ")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_in_the_site_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_the_api_reference_builds_from_the_docstrings(tmp_path: Path) -> None:
    """mkdocs with mkdocstrings renders every public name (a missing docstring or a name that
    no longer resolves fails the build or leaves its heading out)."""
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: portside\.(\w+)$", reference, re.MULTILINE))
    constants = {"KIB", "SECONDS"}  # units, described in the settings reference
    assert documented == set(portside.__all__) - constants
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    html = (site / "reference" / "index.html").read_text()
    for name in documented:
        assert f'id="portside.{name}"' in html, f"{name} is not in the built reference"
    assert "connection_made" in html and "first_data" in html
