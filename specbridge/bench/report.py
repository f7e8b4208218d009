"""Where every benchmark's report goes: one JSON file, and the plot drawn from that JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def save_report(report: dict, name: str, json_path: str, plot: Callable[[dict, Path], None] | None = None,
                plot_path: str | None = None) -> None:
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if plot is not None and plot_path is not None:
        plot(report, Path(plot_path))
    print(f"[{name}] wrote {out}" + (f" and {plot_path}" if plot_path else ""), file=sys.stderr)
