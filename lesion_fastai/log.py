"""What a run tells its user: Python `logging` under the `lesion_fastai` logger, to standard output, and
the progress bars that go with it. Launched in several processes only rank 0 speaks (errors and
warnings come from every rank). `quiet()` silences a block (the benchmarks' many runs): its
messages and its progress bars alike.

    from .log import log, progress
    log.info("pretraining on %d slices", n)
    for item in progress(items, 'checking slice files'): ...
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

__all__ = ['log', 'progress', 'quiet', 'speaking']

log = logging.getLogger('lesion_fastai')


class _Stdout(logging.StreamHandler):
    "Writes to whatever `sys.stdout` is at the time (pytest's capture, a redirect for the other ranks)."
    def __init__(self): super().__init__(sys.stdout)

    @property
    def stream(self): return sys.stdout

    @stream.setter
    def stream(self, value): pass


class _MainRankOnly(logging.Filter):
    "Below WARNING, only rank 0 (or the only process) speaks."
    def filter(self, record):
        if record.levelno >= logging.WARNING: return True
        from .distributed import is_main
        return is_main()


if not log.handlers:
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter('%(message)s'))
    _handler.addFilter(_MainRankOnly())
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def speaking() -> bool:
    "Whether progress and results are shown (INFO messages pass)."
    return log.isEnabledFor(logging.INFO)


@contextmanager
def quiet():
    "Within the block only warnings and errors are shown: no results, no progress bars."
    level = log.level
    log.setLevel(logging.WARNING)
    try: yield
    finally: log.setLevel(level)


def progress(items, comment: str = '', total: int | None = None):
    "`items` with a fastprogress bar, while this process speaks; `items` itself otherwise."
    if not speaking(): return items
    from fastprogress.fastprogress import progress_bar
    bar = progress_bar(items, total=total)
    if comment: bar.comment = comment
    return bar
