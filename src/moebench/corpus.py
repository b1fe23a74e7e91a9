"""The shipped text corpus (King James Bible, public domain) and its fixed train / held-out split.

`data/kjv/kjv.tsv.xz` holds one verse a line, `reference<TAB>text`. The split is by chapter: every
`HELDOUT_EVERY`-th chapter (counted through the whole book, from 0) is held out, so held-out text is whole chapters
the model never saw, spread over every part of the Bible rather than one book. Another group of chapters
(`VALIDATION_OFFSET`) is also kept out of training: the trainer picks its checkpoint on it, never on held-out
text. The same file gives the same split.
"""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HELDOUT_EVERY = 20
HELDOUT_OFFSET = 10
VALIDATION_OFFSET = 0  # chapters kept out of training to pick the checkpoint, so held-out text stays unseen
_REF = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+)$")


def data_dir() -> Path:
    """The repository's data/ folder (the package is used from a checkout: `pip install -e .` or PYTHONPATH=src)."""
    return Path(__file__).resolve().parents[2] / "data"


def kjv_path() -> Path:
    return data_dir() / "kjv" / "kjv.tsv.xz"


@dataclass(frozen=True)
class Verse:
    ref: str
    book: str
    chapter_index: int  # 0-based, counted through the whole Bible
    text: str


@lru_cache(maxsize=2)
def verses(path: str | None = None) -> tuple[Verse, ...]:
    """Every verse in order; raises FileNotFoundError naming the file when the corpus is missing."""
    p = Path(path) if path else kjv_path()
    if not p.is_file():
        raise FileNotFoundError(f"corpus {p} not found; it ships in the repository's data/kjv (see data/kjv/README.md)")
    out: list[Verse] = []
    chapter_index = -1
    last = None
    with lzma.open(p, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            ref, _, text = line.rstrip("\n").partition("\t")
            m = _REF.match(ref)
            if m is None or not text:
                raise ValueError(f"{p}:{line_no}: expected 'Book<chapter>:<verse><TAB>text', got {line[:40]!r}")
            key = (m["book"], m["chapter"])
            if key != last:
                chapter_index += 1
                last = key
            out.append(Verse(ref, m["book"], chapter_index, text))
    return tuple(out)


SPLITS = ("train", "validation", "heldout")


def split_of(verse: Verse) -> str:
    r = verse.chapter_index % HELDOUT_EVERY
    return "heldout" if r == HELDOUT_OFFSET else "validation" if r == VALIDATION_OFFSET else "train"


def split_text(split: str, path: str | None = None) -> str:
    """The verses of `split` ("train", "validation" or "heldout") joined by newlines, in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return "\n".join(v.text for v in verses(path) if split_of(v) == split) + "\n"


def source_note() -> str:
    return (f"King James Bible (Debian bible-kjv-text 4.38, public domain), held-out split: every "
            f"{HELDOUT_EVERY}th chapter (offset {HELDOUT_OFFSET}); validation: offset {VALIDATION_OFFSET}")
