"""Fail when a built HTML page loads a script or stylesheet from the network.

    python docs/check_offline.py docs/_build/html

The documentation must work offline (the project's own machines have no network),
formulas included: MathJax ships with the pages (sphinx-mathjax-offline).
"""

import re
import sys
from pathlib import Path

REMOTE = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["'](?:https?:)?//[^"']+["'][^>]*>""", re.IGNORECASE)


def main(folder: str) -> int:
    pages = sorted(Path(folder).rglob("*.html"))
    found = [(page, m.group(0)) for page in pages for m in REMOTE.finditer(page.read_text(encoding="utf-8"))
             if "stylesheet" in m.group(0) or m.group(0).lower().startswith("<script")]
    for page, tag in found[:10]:
        print(f"{page}: loads from the network: {tag}", file=sys.stderr)
    if not pages:
        print(f"no HTML pages under {folder}", file=sys.stderr)
        return 1
    if not found:
        print(f"{len(pages)} pages, none loads a script or stylesheet from the network")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
