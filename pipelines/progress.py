"""Progress for a person at a terminal and for a log file: every progress bar of fastssl goes through here.

On a terminal, :func:`progress_bar` is a live tqdm bar. Anywhere else (output redirected to a file or a pipe,
``make demo > demo.log 2>&1``, a batch job), tqdm's carriage-return frames would fill the log with thousands
of lines; there it prints plain lines instead: one when the work crosses each tenth, one after a while
without a line (so slow work still shows life), and a last one with the total time and rate. That while is
``LOG_INTERVAL_S`` at first and grows with the elapsed time (a twentieth of it, at most ten intervals): a
bar of 20 minutes prints at most about 30 lines, one of 7 hours about 100, a week-long run a line every 10
minutes. A line reads::

    byol: 940/1876 step (50%), 0:07:30 elapsed, ETA 07:28, 2.09 step/s, loss=0.1234, lr=0.3

Environment: ``FASTSSL_PROGRESS=bar`` or ``log`` forces a mode (default: ``bar`` when the bar's stream is a
terminal); ``FASTSSL_PROGRESS_INTERVAL`` sets the first gap (seconds) between time-driven lines in a log.

This lives in ``pipelines`` so that both packages use it (the RAM-cache fill and the .beton writer here; the
converter, the trainer and the evaluations in fastssl): pipelines never import fastssl.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

MODE_ENV = "FASTSSL_PROGRESS"
INTERVAL_ENV = "FASTSSL_PROGRESS_INTERVAL"
LOG_INTERVAL_S = 60.0  # the first gap between time-driven lines in a log
LOG_GAP_FRACTION = 1 / 20  # later gaps: this share of the elapsed time...
LOG_MAX_INTERVALS = 10  # ...at most this many first gaps
LOG_STEPS = 10  # a line at each tenth of the work...
LOG_MIN_GAP_S = 1.0  # ...unless the previous line is younger than this (a fast bar prints only its last line)


def log_mode(file: TextIO | None = None) -> bool:
    """True when progress written to ``file`` (default ``sys.stderr``) should be plain lines, not a live bar."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("bar", "log"):
        return forced == "log"
    stream = sys.stderr if file is None else file
    try:
        return not stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return True


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(text)
    except ValueError:
        return LOG_INTERVAL_S
    return seconds if seconds > 0 else LOG_INTERVAL_S


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, disable: bool = False, file: TextIO | None = None,
                 **tqdm_kwargs: Any) -> tqdm | LogProgress:
    """A live tqdm bar on a terminal, else a :class:`LogProgress` printing plain lines; same arguments as tqdm.

    Both offer what our code uses of tqdm: iteration over ``iterable``, ``update(n)``, ``set_postfix(**kw)``,
    ``write(msg)``, ``unpause()``, ``close()`` and ``with``. ``tqdm_kwargs`` (``leave``, ``dynamic_ncols``, ...)
    shape only the live bar.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and log_mode(file):
        return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                file=sys.stderr if file is None else file, **tqdm_kwargs)


def write(message: str, file: TextIO | None = None) -> None:
    """Print ``message`` (default: to stdout) above a live bar, and flush, so that in a log it lands in order
    with the progress lines (stdout to a file is block-buffered; the progress lines go to stderr at once)."""
    stream = sys.stdout if file is None else file
    tqdm.write(message, file=stream)
    stream.flush()


class LogProgress:
    """tqdm's interface for a log: plain lines (see the module docstring), never a carriage return.

    ``interval``: the first gap between time-driven lines (default ``LOG_INTERVAL_S`` or the environment's);
    ``clock``: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, file: TextIO | None = None,
                 interval: float | None = None, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.file = file
        self.interval = _interval() if interval is None else interval
        self.clock = clock
        self.start = self.last_line = self.last_update = clock()
        self.postfix = ""
        self.closed = False
        self._step = self._step_of(initial)  # the tenth reached; a resumed bar does not announce the ones done

    def _step_of(self, n: float) -> int:
        return int(LOG_STEPS * n / self.total) if self.total else 0

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LogProgress: iterating needs an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; print a line when a tenth is crossed or the interval has passed."""
        if self.closed:
            return
        self.n += n
        now = self.last_update = self.clock()
        step = self._step_of(self.n)
        finished = self.total is not None and self.n >= self.total
        if finished:
            return  # close() prints the last line, with the final rate
        crossed = step > self._step and now - self.last_line >= LOG_MIN_GAP_S
        gap = min(LOG_MAX_INTERVALS * self.interval, max(self.interval, LOG_GAP_FRACTION * (now - self.start)))
        if crossed or now - self.last_line >= gap:
            self._step = step
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown at the end of the next line, as ``key=value`` (tqdm's ``set_postfix``)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, message: str, file: TextIO | None = None) -> None:
        write(message, file)

    def unpause(self) -> None:
        """Leave the time since the last update (an evaluation between epochs) out of the rate and ETA."""
        now = self.clock()
        self.start += now - self.last_update
        self.last_update = now

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """Print the last line (count, total time, rate) once, if anything was counted."""
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial or (self.total is not None and self.n >= self.total > 0):
            self._print(self.clock(), last=True)

    def _print(self, now: float, last: bool = False) -> None:
        self.last_line = now
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{_num(self.n)}/{_num(self.total)} {self.unit}" if self.total else f"{_num(self.n)} {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        if last:  # a bar closed early (an interruption, train.max_steps) does not say done
            finished = self.total is None or self.n >= self.total
            parts.append(f"{'done in' if finished else 'ended after'} {tqdm.format_interval(elapsed)}")
        else:
            parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
            if self.total and rate > 0:
                parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        parts.append(f"{rate:,.3g} {self.unit}/s" if rate < 100 else f"{rate:,.0f} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        stream = sys.stderr if self.file is None else self.file
        print(", ".join(parts), file=stream, flush=True)


def _num(x: float | None) -> str:
    return f"{int(x):,d}" if x is not None and float(x).is_integer() else f"{x}"
