"""The model-kind contract (app.kinds): a new kind plugs into the engine with one registration, and the
layering holds (app/ stands on models/ only; training/ has no import cycle; only the registry names
kinds). The cold start (ready on torch, right answers through the runtime swap) is tested with the
runtime choice itself, in tests/test_backends.py."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from app.kinds import KINDS, ServedModel, kind_of, register
from app.kinds.base import Handler, ModelKind
from app.routers.models import model_info
from app.settings import Settings
from models.checkpoint import LoadedModel
from models.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parent.parent


class Brightness(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(1, 2, 3))


class BrightnessHandler:
    backend = "torch-fp32"

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model

    def run(self, items: torch.Tensor) -> list[float]:
        return self.model(items).tolist()

    def warmup(self, max_batch_size: int) -> None:
        self.run(torch.zeros(max_batch_size, 3, 4, 4, dtype=torch.uint8))


class BrightnessKind(ModelKind):
    """A kind in a dozen lines: an image's mean brightness, batched by the engine."""

    def handler(self, loaded, *, half=True, channels_last=True, backend=None, threads=None) -> Handler:
        return BrightnessHandler(loaded)

    def describe(self, served: ServedModel) -> dict:
        return {"score_threshold": 0.5}

    def test_accuracy(self, served: ServedModel) -> float | None:
        return None


@pytest.fixture
def brightness_kind():
    kind = register("brightness", BrightnessKind())
    yield kind
    del KINDS["brightness"]


def test_a_registered_kind_is_served_through_the_engine(brightness_kind, tmp_path):
    from app.engine import torch_record
    from app.observability import ServiceMetrics
    from app.service import Service, execution_plan

    loaded = LoadedModel(name="bright", model=Brightness(), architecture="brightness", class_names=[],
                         preprocessing=Preprocessing(input_size=4), start_weights="none", metrics=[],
                         train_args={}, data={}, sha256="0" * 64, path=tmp_path / "bright.pt",
                         device=torch.device("cpu"), kind="brightness")
    assert kind_of(loaded) is brightness_kind

    async def serve_and_ask() -> tuple[list[float], ServedModel]:
        service = Service(Settings(checkpoint_dir=tmp_path, worker_processes=False, warmup=True, instances=1),
                          ServiceMetrics())
        service.device, service.plan = torch.device("cpu"), execution_plan(service.settings, torch.device("cpu"))
        record = torch_record(loaded, threads=1, half=False)
        served = service.serve(loaded, record, service.handler(loaded, record), 0.0)
        images = [torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 10, 200)]
        try:
            return list(await asyncio.gather(*served.batcher.submit(images))), served
        finally:
            await service.close()

    answers, served = asyncio.run(serve_and_ask())
    assert answers == [0.0, 10.0, 200.0]
    info = model_info(served, ["torch-fp32"])
    assert (info.kind, info.name, info.score_threshold, info.backend.running) == \
        ("brightness", "bright", 0.5, ["torch-fp32"])


def test_an_unregistered_kind_is_refused_by_name(tmp_path):
    loaded = LoadedModel(name="odd", model=Brightness(), architecture="odd", class_names=[],
                         preprocessing=Preprocessing(input_size=4), start_weights="none", metrics=[],
                         train_args={}, data={}, sha256="0" * 64, path=tmp_path / "odd.pt",
                         device=torch.device("cpu"), kind="odd")
    with pytest.raises(ValueError, match="no model kind 'odd' is registered"):
        kind_of(loaded)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_serving_stands_on_models_only():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.split(".")[0] == "training")
                 for p in (ROOT / "app").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_training_has_no_import_cycle():
    modules = {f"training.{p.stem}": p for p in (ROOT / "training").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_only_the_registry_names_kinds():
    """Routes, service, engine and bench ask a kind what it does; none compares kind names."""
    pattern = re.compile(r"""["'](%s)["']|architecture\s*(==|!=|not in|in)""" % "|".join(KINDS))
    lines = [f"{p.relative_to(ROOT)}:{n}" for folder in ("app", "bench") for p in sorted((ROOT / folder).rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and p != ROOT / "app" / "kinds" / "__init__.py"
             and "json_schema_extra" not in line and '"model": ' not in line]
    assert not lines
