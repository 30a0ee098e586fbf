"""Cost of upstream-equal caption cleaning: the full cleaner (IF rules + BeautifulSoup html.parser +
ftfy, applied twice) against the IF rules alone (the two library steps made identities), measured in
the same run on the same captions. Prints microseconds per caption and the ratio.

    .venv/bin/python bench/caption_cleaner.py
"""

from __future__ import annotations

import time
from unittest import mock

from osp.common.models import text as T

CAPTIONS = [
    "A Red Ball (bouncing) on the FIELD, shot on 35mm film, 4k.",
    "Tom &amp; Jerry &lt;3 &quot;friends&quot; at https://example.com/x @user123",
    "<p>A <i>cat</i> sleeping</p><br/>on a mat, close-up, soft light",
    "â€œSmart quotesâ€\x9d in a caption copied from a web page, this-is-my-cute-cat",
    "一只猫在草地上奔跑 a cat runs across a sunny meadow in slow motion",
    "Aerial view of a coastline at sunset, waves crashing on the rocks, drone footage 1920x1080",
] * 50


class _Plain:
    """BeautifulSoup stand-in: .text is the input (the rules-only baseline)."""

    def __init__(self, markup, features=None):
        self.text = markup


def _per_caption_us(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in CAPTIONS:
            fn(c)
        best = min(best, time.perf_counter() - t0)
    return best / len(CAPTIONS) * 1e6


def main() -> None:
    T.clean_caption(CAPTIONS[0])  # warm the regex cache
    full = _per_caption_us(T.clean_caption)
    with mock.patch.object(T, "BeautifulSoup", _Plain), mock.patch.object(T.ftfy, "fix_text", lambda s: s):
        rules = _per_caption_us(T.clean_caption)
    ident = T.cleaner_identity()
    print(
        f"caption cleaner ({ident['name']}, ftfy {ident['ftfy']}, beautifulsoup4 {ident['beautifulsoup4']}), "
        f"{len(CAPTIONS)} captions, best of 3"
    )
    print(f"  full cleaner (upstream-equal): {full:8.1f} us/caption")
    print(f"  IF rules only (baseline):      {rules:8.1f} us/caption")
    print(f"  ratio full / rules only:       {full / rules:8.2f}x")


if __name__ == "__main__":
    main()
