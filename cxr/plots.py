"""Training curves (loss / accuracy / AUC per epoch) as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        # not the same quantity: training's loss is class-weighted and label-smoothed, validation's plain NLL
        ("loss", [("loss", "train (weighted, smoothed)"), ("val_loss", "val (plain NLL)")]),
        ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "val @0.5")]),
        ("val AUC / sens / spec", [("val_auc", "AUC"), ("val_sensitivity", "sensitivity @0.5"),
                                   ("val_specificity", "specificity @0.5")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            ax.plot(epochs, [h.get(key) for h in history], marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
