"""The training curves of a checkpoint as a PNG (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import io
import threading
from functools import lru_cache

from matplotlib.figure import Figure

# Figure objects (not pyplot) are independent, but the font cache and mathtext are shared state.
_lock = threading.Lock()


def training_curves_png(metrics: tuple[tuple[int, float, float, float, float], ...], title: str) -> bytes:
    """metrics: (epoch, train_loss, train_accuracy, test_loss, test_accuracy) per epoch."""
    return _render(metrics, title)


@lru_cache(maxsize=32)
def _render(metrics: tuple[tuple[int, float, float, float, float], ...], title: str) -> bytes:
    epochs = [m[0] for m in metrics]
    with _lock:
        fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        loss_ax.plot(epochs, [m[1] for m in metrics], "o-", label="train loss")
        loss_ax.plot(epochs, [m[3] for m in metrics], "s-", label="test loss")
        loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        acc_ax.plot(epochs, [100 * m[2] for m in metrics], "o-", label="train accuracy")
        acc_ax.plot(epochs, [100 * m[4] for m in metrics], "s-", label="test accuracy")
        acc_ax.set(xlabel="epoch", ylabel="%", title="accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            ax.legend()
            if epochs:
                ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        fig.suptitle(title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
