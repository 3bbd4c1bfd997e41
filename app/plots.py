"""The training curves of a checkpoint as a PNG (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import io
import threading
from functools import lru_cache

from matplotlib.figure import Figure

# Figure objects (not pyplot) are independent, but the font cache and mathtext are shared state.
_lock = threading.Lock()

Series = tuple[tuple[str, tuple[float, ...]], ...]  # (label, one value per epoch), hashable for the cache


def curves(metrics: list[dict]) -> tuple[tuple[int, ...], Series, Series]:
    """A checkpoint's per-epoch metrics -> (epochs, loss curves, score curves in [0, 1])."""
    epochs = tuple(int(m["epoch"]) for m in metrics)

    def series(*pairs: tuple[str, str]) -> Series:
        return tuple((label, tuple(float(m[key]) for m in metrics)) for label, key in pairs
                     if metrics and key in metrics[0])

    losses = series(("train loss", "train_loss"), ("test loss", "test_loss"))
    scores = series(("train accuracy", "train_accuracy"), ("test accuracy", "test_accuracy"),
                    ("test accuracy, last step", "online_test_accuracy"),
                    ("val precision", "val_precision"), ("val recall", "val_recall"), ("val AP@0.5", "val_map50"))
    return epochs, losses, scores


@lru_cache(maxsize=32)
def training_curves_png(epochs: tuple[int, ...], losses: Series, scores: Series, title: str) -> bytes:
    with _lock:
        fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
        loss_ax, score_ax = fig.subplots(1, 2)
        for ax, panel, scale in ((loss_ax, losses, 1), (score_ax, scores, 100)):
            for (label, values), marker in zip(panel, "os^dvx"):
                ax.plot(epochs, [scale * v for v in values], f"{marker}-", label=label)
        loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
        score_ax.set(xlabel="epoch", ylabel="%", title="accuracy" if any("accuracy" in s[0] for s in scores)
                     else "detection")
        for ax in (loss_ax, score_ax):
            ax.grid(alpha=0.3)
            ax.legend()
            if epochs:
                ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        fig.suptitle(title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
