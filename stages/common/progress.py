"""Progress of long loops, on a terminal and in a log file alike.

On a terminal, a tqdm bar. When stderr is not a terminal (NSML, nohup, CI), where tqdm would
stay silent or fill the file with carriage returns, a line goes to the package logger every
`LOG_EVERY_S` seconds instead: done/total, the rate and the time left.
"""

import sys
import time

from tqdm import tqdm

from . import logger

LOG_EVERY_S = 30.0


class Progress:
    """A progress counter: ``with Progress(total, desc, unit) as p: ... p.update(n)``.

    Args:
        total: the count at the end (None if unknown).
        desc: what is counted, e.g. "global descriptors".
        unit: the unit, e.g. "img".
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it"):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if sys.stderr.isatty() else None
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Counts `n` more done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= LOG_EVERY_S:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9)
            left = f", about {(self.total - self.done) / rate:.0f} s left" if self.total and rate > 0 else ""
            logger.info("%s: %d of %s %s (%.2f %s/s%s)", self.desc, self.done,
                        self.total if self.total is not None else "?", self.unit, rate, self.unit, left)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "it"):
    """Yields the items of `iterable`, counting them with a `Progress`."""
    with Progress(total if total is not None else _len(iterable), desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update()


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
