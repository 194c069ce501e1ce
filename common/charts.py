"""Charts: matplotlib set up for files, not screens, and figures written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from common.files import temp_path


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write a figure as PNG atomically and free it."""
    path = Path(path)
    tmp = temp_path(path)
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
