"""The docs stay true: the CLI reference is the parser's, links resolve, the README stays short."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_cli_reference_is_the_parsers(monkeypatch):
    """Check that docs/cli.md is what `python scripts/cli_docs.py` writes from the parser now."""
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    monkeypatch.setenv("COLUMNS", cli_docs.WIDTH)
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), \
        "docs/cli.md is out of date: run python scripts/cli_docs.py"


def test_links_resolve():
    """Check that every relative link in the README and the guides names a file that exists."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, _ in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_readme_is_a_front_door():
    """Check that the README stays short and keeps its two set-up commands."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
