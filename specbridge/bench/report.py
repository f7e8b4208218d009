"""Where every benchmark's report goes: one JSON file, and the plot drawn from that JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_report(report: dict, name: str, json_path: str, plot: Callable[[dict, Path], None] | None = None,
                plot_path: str | None = None) -> None:
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if plot is not None and plot_path is not None:
        plot(report, Path(plot_path))
    print(f"[{name}] wrote {out}" + (f" and {plot_path}" if plot_path else ""), file=sys.stderr)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend: benchmarks draw files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(figure: Any, axes: list[Any], title: str, path: Path) -> None:
    """Legends and grids on `axes`, the title, then the figure written to `path` (at 120 dpi) and closed."""
    for axis in axes:
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> None:
    """The figure laid out, written to `path` (at 120 dpi) and closed."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
