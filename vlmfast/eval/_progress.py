"""Progress bars and diagnostics on stderr, one implementation for every command.

    with Progress(len(paths), "embed", unit="images", enabled=not args.quiet) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
            bar.write(f"skipped {path}: {reason}")   # a diagnostic line: the bar steps aside

The bar is drawn only on a terminal (a log file or a pipe gets no carriage-return noise), only
once the work has taken longer than `delay` seconds (short commands stay silent), at most ten
times a second, and never with enabled=False (--quiet). Diagnostic lines from `write` always go
to the stream, bar or not: results belong on stdout or in --out, everything else here.
"""

from __future__ import annotations

import sys
import time

# Seconds of work before a bar appears: commands that finish sooner print no bar at all.
DELAY = 1.0


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class Progress:
    """A one-line bar of `total` steps ("12/300 images 4.1 s, 2.9/s ETA 98 s") on `stream`
    (default stderr). update(n, status=...) advances it; status is a short text shown after it."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "", enabled: bool = True, stream=None,
                 delay: float | None = None, width: int = 24):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.drawing = enabled and _is_terminal(self.stream)
        self.delay = DELAY if delay is None else delay
        self.done = 0
        self.status = ""
        self.started = time.monotonic()
        self._drawn_at = None  # when the bar was last drawn; None: not on screen
        self._line_length = 0

    # ------------------------------------------------------------------ use
    def update(self, n: int = 1, *, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.drawing and now - self.started >= self.delay and (
                self._drawn_at is None or now - self._drawn_at >= 0.1 or finished):
            self._draw(now)

    def write(self, message: str) -> None:
        """A diagnostic line on the stream; the bar (if shown) is cleared and drawn again below it."""
        shown = self._drawn_at is not None
        if shown:
            self._clear()
        self.stream.write(message + "\n")
        self.stream.flush()
        if shown:
            self._draw(time.monotonic())

    def close(self) -> None:
        if self._drawn_at is not None:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_at = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ drawing
    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            filled = self.width * min(self.done, self.total) // self.total
            text = f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}{unit}"
            left = (self.total - self.done) / rate if rate > 0 and self.done < self.total else None
        else:
            text, left = f"{self.desc} {self.done}{unit}", None
        text += f" {elapsed:.1f} s"
        if rate > 0:
            text += f", {rate:.3g}/s" if rate < 100 else f", {rate:.0f}/s"
        if left is not None:
            text += f", ETA {left:.0f} s"
        return text + (f"  {self.status}" if self.status else "")

    def _draw(self, now: float) -> None:
        text = self.line(now)
        padding = " " * max(0, self._line_length - len(text))
        self.stream.write("\r" + text + padding)
        self.stream.flush()
        self._line_length = len(text)
        self._drawn_at = now

    def _clear(self) -> None:
        self.stream.write("\r" + " " * self._line_length + "\r")
        self._line_length = 0


def progress(iterable, total: int, desc: str, *, enabled: bool = True, unit: str = "", stream=None):
    """Yields from `iterable` while a Progress bar of `total` steps counts them."""
    with Progress(total, desc, unit=unit, enabled=enabled, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)
