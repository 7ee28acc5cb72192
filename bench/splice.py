"""Copy bench/out/README_table.md into README.md between `<!-- bench:start -->` and
`<!-- bench:end -->`; nothing outside the markers changes."""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def splice_text(readme: str, table: str) -> str:
    """readme with the text between the markers replaced by table (markers kept)."""
    i, j = readme.find(START), readme.find(END)
    if i < 0 or j < 0 or j < i or readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"readme must contain exactly one {START} followed by one {END}")
    return readme[: i + len(START)] + "\n" + table.strip("\n") + "\n" + readme[j:]


def splice(readme_path: str | Path, table_path: str | Path) -> None:
    p = Path(readme_path)
    p.write_text(splice_text(p.read_text(), Path(table_path).read_text()))
