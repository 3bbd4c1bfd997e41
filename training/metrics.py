"""Loss and accuracy summed over batches, the same way for training and evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class LossAccuracy:
    """Cross-entropy sum, correct predictions and samples, kept on the device (no sync per batch).
    `result` sums them over the DDP ranks, so every rank returns the global figures."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        self.totals[1] += (logits.argmax(1) == labels).sum()
        self.totals[2] += len(labels)

    def result(self, world: int = 1) -> dict:
        """{"loss": mean cross-entropy, "accuracy": share right, "n": samples}."""
        if world > 1:
            dist.all_reduce(self.totals)
        n = int(self.totals[2].item())
        return {"loss": self.totals[0].item() / max(n, 1), "accuracy": self.totals[1].item() / max(n, 1), "n": n}
