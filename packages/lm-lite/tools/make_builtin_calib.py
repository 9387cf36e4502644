"""Regenerate `src/lm_lite/data/calib_builtin.txt` from the Python Language Reference that CPython ships.

CPython carries the text of its language reference in `pydoc_data/topics.py` (what `help("assignment")` shows),
under the PSF License Agreement (`src/lm_lite/data/PSF-LICENSE.txt`). This script takes the topics in sorted order,
rejoins hard-wrapped prose lines into paragraphs (indented code and grammar blocks stay as they are) and stops at
about 300 KB. Topics are separated by two blank lines, which is how `calib_data.load_texts` splits documents.
The shipped file was made with CPython 3.11.7: `python tools/make_builtin_calib.py`.
"""

from __future__ import annotations

import pydoc_data.topics
import sys
from pathlib import Path

LIMIT = 300_000
OUT = Path(__file__).resolve().parents[1] / "src" / "lm_lite" / "data" / "calib_builtin.txt"


def reflow(text: str) -> str:
    """One topic's text with hard-wrapped prose lines rejoined into paragraphs; indented blocks kept as they are."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "\t", "*", "=", "-")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            if line.strip():
                paragraphs.append(line.rstrip())
            elif paragraphs and paragraphs[-1] != "":
                paragraphs.append("")
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs).strip()


def main() -> None:
    """Writes the sorted topics, reflowed, up to `LIMIT` characters, to `OUT`."""
    docs, size = [], 0
    for name in sorted(pydoc_data.topics.topics):
        doc = reflow(pydoc_data.topics.topics[name])
        if size + len(doc) > LIMIT:
            break
        docs.append(doc)
        size += len(doc)
    OUT.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{len(docs)} topics, {OUT.stat().st_size} bytes from Python {sys.version.split()[0]} -> {OUT}")


if __name__ == "__main__":
    main()
