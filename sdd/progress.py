"""Progress of long work: a bar on a terminal, a log line every few percent elsewhere.

A ResNet-18 preset trains for hours; a person at a terminal sees epochs, loss and ETA move, while
a log file (or a CI job) gets one line per `LOG_STEP` of the work instead of a redrawn bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

LOG_STEP = 0.05  # log a line each time another 5% of the work is done
UNSIZED_SIZE = (100, 24)  # columns, rows


class Progress:
    """`update(done, **shown)` with `done` counted in `unit`s out of `total`."""

    def __init__(self, total: int, description: str, *, unit: str = "epoch", initial: int = 0,
                 logger: logging.Logger | None = None) -> None:
        self.total, self.description, self.unit = max(1, total), description, unit
        self.logger = logger or logging.getLogger("sdd.progress")
        self.started, self.first = time.monotonic(), initial
        self.next_log = initial / self.total + LOG_STEP
        self.bar = None
        if sys.stderr.isatty() and self.logger.isEnabledFor(logging.INFO):
            from tqdm import tqdm

            # A terminal that reports no size (a bare pseudo-terminal) would hide the bar: 0 rows, 0 columns.
            sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            unsized = {} if sized else {"ncols": UNSIZED_SIZE[0], "nrows": UNSIZED_SIZE[1]}
            self.bar = tqdm(total=self.total, initial=initial, desc=description, unit=unit, dynamic_ncols=sized,
                            leave=False, **unsized)

    def update(self, done: int, **shown: Any) -> None:
        text = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()}
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if text:
                self.bar.set_postfix(text, refresh=False)
            return
        fraction = done / self.total
        if fraction + 1e-9 < self.next_log and done < self.total:
            return
        while self.next_log <= fraction + 1e-9:
            self.next_log += LOG_STEP
        elapsed = time.monotonic() - self.started
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        extra = "".join(f", {k} {v}" for k, v in text.items())
        self.logger.info("%s: %s %d/%d (%.0f%%)%s, %.0fs elapsed, ETA %.0fs", self.description, self.unit, done,
                         self.total, 100 * fraction, extra, elapsed, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
