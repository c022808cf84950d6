"""Check the documentation's relative links: every target file exists and every `#anchor` names a heading.

Run from anywhere: ``python docs/check_links.py``. It reads README.md and every ``docs/**/*.md``, prints one line
per broken link (file, link, why) and exits 1 if there is any, 0 otherwise. External links (``http(s)://``,
``mailto:``) are not fetched: the docs must stay checkable offline.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# [text](target) outside code spans; images too. Targets with spaces are not used in these docs.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (headings inside fenced code blocks excluded)."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside fenced code blocks and code spans."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out += LINK.findall(CODE_SPAN.sub("", line))
    return out


def broken(path: Path) -> list[str]:
    """One message per broken relative link in ``path``."""
    problems = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: — not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def main() -> int:
    problems = [p for f in doc_files() for p in broken(f)]
    readme_docs = [t for t in links(ROOT / "README.md") if t.startswith("docs/")]
    for p in problems:
        print(p)
    print(f"{len(doc_files())} files, {len(readme_docs)} docs/ links in README.md, {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
