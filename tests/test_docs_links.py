"""Every relative link of the README and docs/ leads somewhere (#23, point 1: the README is a
front page, the depth is in docs/): each `](path)` names a file or folder of this repository,
and each `](path#anchor)` or `](#anchor)` a heading of that Markdown file, slugged as GitHub
slugs headings. Offline: links to http(s) are not followed."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def markdown_files(root: Path) -> list[Path]:
    """The pages users read: the README, the CHANGELOG, docs/ and the benchmark's README."""
    pages = [root / "README.md", root / "CHANGELOG.md", root / "bench" / "README.md"]
    return pages + sorted((root / "docs").glob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code, with inline code removed: a `](x)` in code is no link."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens and
    underscores kept), each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ..."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if in_fence or not heading:
            continue
        slug = github_slug(heading[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path, root: Path) -> list[str]:
    """Each relative link of `page` whose file, folder or heading does not exist."""
    problems = []
    for number, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            where = page if not path_part else (page.parent / path_part).resolve()
            name = f"{page.relative_to(root)}: ]({target})"
            if root.resolve() not in (where, *where.parents):
                problems.append(f"{name} leaves the repository")
            elif not where.exists():
                problems.append(f"{name}: no such file")
            elif anchor and (where.is_dir() or where.suffix != ".md"):
                problems.append(f"{name}: an anchor into a file that is not Markdown")
            elif anchor and anchor not in anchors(where):
                problems.append(f"{name}: no heading with this anchor in {where.name}")
    return problems


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = markdown_files(ROOT)
    assert len(pages) > 4 and all(page.is_file() for page in pages), pages
    problems = [problem for page in pages for problem in broken_links(page, ROOT)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = "\n".join(prose_lines((ROOT / "README.md").read_text(encoding="utf-8")))
    targets = {target.partition("#")[0] for target in LINK.findall(readme)}
    unlinked = [page.name for page in sorted((ROOT / "docs").glob("*.md"))
                if f"docs/{page.name}" not in targets]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_slugs_are_githubs():
    assert github_slug("Where the data come from: `--mode nbia`, `idc`, `auto`") == \
        "where-the-data-come-from---mode-nbia-idc-auto"
    assert github_slug("Citing the data: `<Collection>/CITATION.md`") == \
        "citing-the-data-collectioncitationmd"
    assert github_slug("1. Copy one file: `tcia_downloader.pyz`") == \
        "1-copy-one-file-tcia_downloaderpyz"


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#its-part) [ok](#top) [web](https://x.org/#y)\n"
                    "`[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
                    "[gone](docs/b.md) [no part](docs/a.md#other) [no top](#bottom)\n"
                    "# Top\n", encoding="utf-8")
    problems = broken_links(page, tmp_path)
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "](docs/b.md): no such file",
        "](docs/a.md#other): no heading with this anchor in a.md",
        "](#bottom): no heading with this anchor in README.md"], problems
