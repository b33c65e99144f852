"""The figures the cluster tests measure, one JSON file each in bench/results."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.common import ROOT

RESULTS = ROOT / "bench" / "results"


def save_figure(fig, title: str, path: Path) -> None:
    """A results file's plot: ``fig`` with its title, written to ``path`` (the PNG beside the JSON)."""
    import matplotlib.pyplot as plt  # the test module chose the Agg backend first

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def record(name: str, figures: dict) -> Path:
    """Write ``figures`` to bench/results/<name>.json and print the file's name with their start."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{path.relative_to(ROOT)}: {json.dumps(figures)[:1200]}")
    return path
