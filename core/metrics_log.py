"""Training metrics: a CSV and a loss plot under the job's output (local or s3://).

The whole CSV is rewritten atomically at every flush (it is small: one row per ``log_every`` steps),
so object stores, which cannot append, work the same as a local disk. On resume the rows after the
checkpoint's step are dropped: those steps are about to be trained again, and keeping them would
duplicate rows.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from ddm.core import storage

FIELDS: tuple[str, ...] = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")


def read_rows(url: str) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats (``step`` as an int-valued float is returned as int)."""
    text = storage.read_bytes(url).decode()
    rows = []
    for i, raw in enumerate(csv.DictReader(io.StringIO(text))):
        try:
            row: dict[str, float] = {k: float(v) for k, v in raw.items() if k in FIELDS}
        except (TypeError, ValueError):
            raise ValueError(f"{url}: line {i + 2} is not numeric ({raw}); the file is corrupt") from None
        row["step"] = int(row["step"])
        rows.append(row)
    return rows


class MetricsLog:
    """Metric rows in memory, written out as ``metrics.csv`` and ``loss.png`` under ``output``."""

    def __init__(self, output: str, *, resume_step: int, title: str = "", ylabel: str = "flow-matching loss"):
        self.csv_url = storage.join(output, "metrics.csv")
        self.png_url = storage.join(output, "loss.png")
        self.title = title
        self.ylabel = ylabel  # the router trainer logs a cross-entropy
        self.rows: list[dict[str, float]] = []
        if resume_step > 0 and storage.exists(self.csv_url):
            self.rows = [r for r in read_rows(self.csv_url) if r["step"] <= resume_step]

    def append(self, **row: float) -> None:
        missing = set(FIELDS) - set(row)
        assert not missing, f"metric row lacks {missing}"
        self.rows.append({k: row[k] for k in FIELDS})

    def flush(self) -> None:
        """Rewrite the CSV with every row (floats at full precision, so resumed runs compare exactly)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(FIELDS)
        for row in self.rows:
            writer.writerow([int(row["step"])] + [repr(float(row[k])) for k in FIELDS[1:]])
        storage.write_bytes(self.csv_url, buf.getvalue().encode())

    def plot(self) -> None:
        """Write ``loss.png``: loss against step, log scale (the Agg canvas directly: no pyplot state)."""
        if not self.rows:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [r["step"] for r in self.rows]
        losses = [r["loss"] for r in self.rows]
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(steps, losses, lw=1.2)
        if all(v > 0 and math.isfinite(v) for v in losses):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title or "training loss")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        storage.write_bytes(self.png_url, buf.getvalue())

    def losses(self) -> Sequence[float]:
        return [r["loss"] for r in self.rows]
