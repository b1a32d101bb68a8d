"""The picture of LFPC's learned choices: each group's criterion probabilities."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_choices"]


def plot_choices(rows: list[dict[str, Any]], path, title: str = "LFPC: learned criterion per group"):
    """A heat map of each group's criterion probabilities, the chosen one outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = list(rows[0]["probabilities"])
    probs = np.array([[r["probabilities"][c] for c in criteria] for r in rows])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 3.2), dpi=120)
    image = ax.imshow(probs.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, r in enumerate(rows):
        j = criteria.index(r["choice"])
        ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="white", lw=1.5))
    ax.set_yticks(range(len(criteria)), criteria)
    ax.set_xticks(range(len(rows)), [r["group"] for r in rows], rotation=90, fontsize=6)
    ax.set_xlabel("prunable group (graph order); outlined: the chosen criterion")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="sampler probability")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
