"""Write docs/cli.md: every command's --help, from the parser itself (run after changing the CLI).

    python scripts/cli_docs.py            # rewrite docs/cli.md
    python scripts/cli_docs.py --check    # exit 1 when docs/cli.md is not what the parser says

tests/test_docs.py runs the check, so the reference never drifts from the code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = "100"


def render() -> str:
    """The reference: the top-level help, then each command's, at a fixed width."""
    os.environ["COLUMNS"] = WIDTH  # argparse wraps at the terminal's width
    from cnncodes._cli.main import _parser

    parser = _parser()
    parts = ["# Command line\n\n",
             "Generated from the parser by `python scripts/cli_docs.py`; do not edit by hand.\n\n",
             "```\n", parser.format_help(), "```\n"]
    for name, sub in parser.commands.items():
        parts += [f"\n## cnncodes {name}\n\n", "```\n", sub.format_help(), "```\n"]
    return "".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python scripts/cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
