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

__all__ = ['log', 'progress', 'quiet', 'speaking', 'hush_third_party', 'THIRD_PARTY_NOISE']

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
    """`items` with a fastprogress bar, while this process speaks; `items` itself otherwise. In a
    console the finished bar ends its line, so the next message starts on a line of its own."""
    if not speaking(): return items
    from fastprogress.fastprogress import ConsoleProgressBar, progress_bar
    bar = progress_bar(items, total=total)
    if comment: bar.comment = comment
    return _ending_line(bar) if isinstance(bar, ConsoleProgressBar) else bar


def _ending_line(bar):
    try: yield from bar
    finally: print(flush=True)


# (category, message pattern) of the warnings third-party code prints on every command, which say
# nothing a user of this package can act on: fastai 2.8 scripting activations with torch.jit.script,
# fastai reading `numpy.core`, fastai's tensors' `__array__` as matplotlib calls it, fastai's tabular
# module setting a pandas option pandas 3 deprecated.
THIRD_PARTY_NOISE = [(FutureWarning, r'`torch\.jit\.script` is deprecated'),
                     (DeprecationWarning, r'numpy\.core is deprecated'),
                     (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword"),
                     (Warning, r"The 'mode\.chained_assignment' option is deprecated"),
                     (Warning, r'IProgress not found')]       # tqdm in a notebook without ipywidgets (fastai's own bars still show)


def hush_third_party(name: str = '__main__'):
    """Filter `THIRD_PARTY_NOISE`, when `name` (the caller's `__name__`) is `'__main__'`: each entry
    point calls it first thing, before fastai is imported; tests and library use keep every warning."""
    if name != '__main__': return
    import warnings
    for category, message in THIRD_PARTY_NOISE: warnings.filterwarnings('ignore', message=message, category=category)
