"""A progress bar on stderr: tqdm when it is installed, else a one-line bar of our own."""

import sys
import time


def progress(iterable, total: int, desc: str, *, enabled: bool = True):
    """Yields from `iterable` while drawing a bar of `total` steps on stderr."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from _plain(iterable, total, desc)
        return
    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def _plain(iterable, total: int, desc: str, width: int = 30):
    start = time.monotonic()
    done = 0

    def draw():
        filled = width * done // max(total, 1)
        elapsed = time.monotonic() - start
        sys.stderr.write(f"\r{desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.1f}s")
        sys.stderr.flush()

    draw()
    for item in iterable:
        yield item
        done += 1
        draw()
    sys.stderr.write("\n")
    sys.stderr.flush()
