"""Progress bars on long work (tqdm), off when output is not a terminal unless asked for."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enable: bool | None = None, total: int | None = None) -> Iterable[T]:
    if enable is None:
        enable = sys.stderr.isatty()
    if not enable:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)
