"""Run a classifier over uint8 image tensors and keep what calibration needs: logits and features."""

from __future__ import annotations

import torch

from models.architectures import classifier_head, penultimate_features
from models.checkpoint import LoadedModel
from models.preprocessing import normalize


@torch.inference_mode()
def logits_and_features(loaded: LoadedModel, images: torch.Tensor, batch_size: int = 256
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], penultimate features [N, D]), float32 on the CPU, in eval mode."""
    model = loaded.model.eval()
    head = classifier_head(model)
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(loaded.device), loaded.preprocessing)
        f = penultimate_features(model, x.contiguous(memory_format=torch.channels_last))
        logits.append(head(f).float().cpu())
        features.append(f.float().cpu())
    return torch.cat(logits), torch.cat(features)
