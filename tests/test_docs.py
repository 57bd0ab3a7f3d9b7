"""The README stays short and its links work; the docs site covers the whole API.

`make test` also builds the site with `mkdocs build --strict` (`make docs`), which fails on a broken link,
anchor or API reference inside docs/; this file checks what mkdocs does not see: README.md's links
(relative to the repository, as GitHub renders them) and that every `fedsd.api` name has a reference entry.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def slug(heading: str) -> str:
    """GitHub's (and Python-Markdown's) anchor of a heading: lower case, punctuation dropped, spaces → '-'."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"\s+", "-", text)


def anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_short_and_has_the_promised_sections() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    heads = re.findall(r"^## (.+)$", text, re.M)
    for wanted in ("Install", "The two commands", "Quick tour", "Your own corpus", "Deploy a server and devices",
                   "Results at a glance"):  # fmt: skip
        assert wanted in heads, heads
    tour = re.search(r"^## Quick tour\n+```bash\n(.*?)```", text, re.S | re.M)
    assert tour and len(tour.group(1).splitlines()) <= 10


def test_readme_links_resolve() -> None:
    broken = []
    for target in links(README):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = README if not path else (REPO / path)
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path or 'README.md'}")
    assert not broken, broken


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test   #" in README.read_text(encoding="utf-8")
    ci = [
        ln.strip()
        for ln in (REPO / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ci[-1] == "make test", ci


def test_api_reference_covers_every_api_name() -> None:
    from fedsd import api

    reference = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: ([\w.]+)$", reference, re.M))
    for name, target in api._TARGETS.items():
        module, _, attr = target.partition(":")
        on_disk = re.sub(r"^fedsd\.(server|clients)\b", r"\1", module)  # griffe reads server/, clients/ as is
        assert f"{on_disk}.{attr}" in documented, f"docs/reference.md lacks api.{name} ({target})"


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages and all(f": {p}" in nav for p in pages), pages


def test_cli_page_shows_every_command() -> None:
    """docs/cli.md has an example line for every `fedsd` command, so a new command cannot go undocumented."""
    import click
    import typer

    from fedsd.cli.main import app

    def commands(cmd: click.Command, prefix: list[str]) -> list[str]:
        if isinstance(cmd, click.Group):
            return [c for name, sub in cmd.commands.items() for c in commands(sub, [*prefix, name])]
        return [" ".join(prefix)]

    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    every = commands(typer.main.get_command(app), [])
    assert len(every) > 15
    missing = [c for c in every if f"fedsd {c} " not in page]
    assert not missing, f"docs/cli.md has no example of: {missing}"


def test_no_citation_of_a_missing_design_file() -> None:
    """Source files cite docs/architecture.md's numbered sections; the old design file is not in the repo."""
    import subprocess

    name = "DESIGN" + ".md"
    hits = subprocess.run(["git", "grep", "-n", name, "--", ".", ":!tests/test_docs.py"], cwd=REPO,
                          capture_output=True, text=True).stdout  # fmt: skip
    assert not hits, hits
    assert "## 1. The multi-exit model" in (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
