"""One progress bar for every long loop: live on a terminal, a line every 30 s in a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(**kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)`` that does not flood logs: when stderr is not a terminal (jobs, CI, TorchX
    log files) it redraws at most every 30 s instead of ten times a second."""
    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
