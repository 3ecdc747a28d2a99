"""Every relative link in the user-facing Markdown points at a file or directory inside the
repository (no network, no subprocess: links are read with a regular expression)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

# [text](target), [text](target#anchor), [text](target "title"), [text](<target>); the
# text may hold one level of brackets, and `![alt](src)` is matched by its `[alt](src)`.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
SKIPPED_PREFIXES = ("http://", "https://", "mailto:", "#")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/*.md and examples/README.md, those that exist."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")),
             root / "examples" / "README.md"]
    return [path for path in files if path.is_file()]


def link_targets(text: str) -> Iterator[str]:
    """The targets of the inline links in Markdown text, outside code blocks and spans
    (a code span inside a link's text is kept as plain text)."""
    text = FENCE.sub("", text)
    text = CODE_SPAN.sub(lambda match: "code", text)
    for match in LINK.finditer(text):
        target = match.group(1)
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1].strip()
        yield target


def broken_link(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a link from `source` is broken, or None when it resolves inside `root` (or is
    not a relative link at all)."""
    if not target or target.lower().startswith(SKIPPED_PREFIXES):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return None
    if path.startswith("/"):
        return "absolute path; use one relative to the file"
    resolved = (source.parent / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or directory"
    return None


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per broken link: the file (relative to root), the target and why."""
    found = []
    for source in files:
        for target in link_targets(source.read_text(encoding="utf-8")):
            reason = broken_link(source, target, root)
            if reason is not None:
                found.append(f"{source.relative_to(root)}: ({target}) {reason}")
    return found


def test_relative_links_resolve_inside_the_repository() -> None:
    files = markdown_files()
    assert files, f"no Markdown files found under {ROOT}"
    broken = broken_links(files)
    assert not broken, "broken Markdown links:\n" + "\n".join(broken)


def test_the_checker_finds_escaping_missing_and_absolute_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# There\n")
    (tmp_path / "pkg").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](there.md) [anchor](there.md#there) [dir](../pkg/) [self](#top)\n"
        "[web](https://example.com/x) [mail](mailto:a@example.com) [titled](there.md \"T\")\n"
        "[`code text`](../../shared/ARCHITECTURE.md) ![img](missing.png)\n"
        "[abs](/etc/passwd) [nested [brackets]](<there.md>)\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[also not](nowhere.md)\n```\n")
    assert broken_links([page], tmp_path) == [
        "docs/page.md: (../../shared/ARCHITECTURE.md) points outside the repository",
        "docs/page.md: (missing.png) no such file or directory",
        "docs/page.md: (/etc/passwd) absolute path; use one relative to the file",
    ]
