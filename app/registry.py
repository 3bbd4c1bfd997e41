"""The loaded models, by name (the checkpoint file's stem: cnn, resnet18, ...)."""

from __future__ import annotations

from models.checkpoint import LoadedModel


class ModelRegistry:
    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self._models = dict(models)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> LoadedModel:
        """The model called `name`; KeyError when there is none."""
        return self._models[name]

    def best(self) -> str:
        """The name of the model with the highest final test accuracy (the default for /v1/predict)."""
        return max(self._models, key=lambda n: self._models[n].test_accuracy or 0.0)

    def __len__(self) -> int:
        return len(self._models)
