"""The repository's own docs: every "docs/<page>.md §N" citation names a section that exists, links resolve."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED_IN = ("src", "configs", "tests", "benchmarks", "notebooks", "README.md", "CHANGELOG.md", "docs")
CITATION = re.compile(r"docs/(\w+)\.md §(\d+(?:\.\d+)?)(?:[–-](\d+(?:\.\d+)?))?")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text_files() -> list[Path]:
    files: list[Path] = []
    for name in CITED_IN:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.suffix in {".py", ".yaml", ".md", ".ipynb"} and p.is_file()]
    return files


def _sections(page: str) -> set[str]:
    return set(HEADING.findall((ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")))


def test_every_docs_citation_names_an_existing_section():
    cited = []
    for path in _text_files():
        for page, first, last in CITATION.findall(path.read_text(encoding="utf-8")):
            where = path.relative_to(ROOT)
            assert (ROOT / "docs" / f"{page}.md").is_file(), f"{where} cites docs/{page}.md, which does not exist"
            for section in filter(None, (first, last)):
                assert section in _sections(page), f"{where} cites docs/{page}.md §{section}, which has no such section"
            cited.append((page, first))
    assert len(cited) >= 10, "the sources should cite the docs; found almost no citations"


def test_nothing_cites_files_outside_the_repository():
    this_file = Path(__file__).resolve()
    for path in _text_files():
        if path.resolve() == this_file:
            continue
        text = path.read_text(encoding="utf-8")
        for outside in ("MPAE_SPEC", "../shared", "/work/"):
            assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside!r}, which is not in the repository"


def test_relative_links_in_markdown_resolve():
    for path in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
