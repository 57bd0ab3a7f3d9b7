"""One figure per results PNG: headless matplotlib, tight layout, written where the results go."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def figure(path: Path, *, dpi: int = 120, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, figsize=(6, 4)) as (fig, ax):`` draw; on exit the PNG is saved and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
