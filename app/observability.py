"""Prometheus metrics of the service, exposed at GET /metrics.

Each app owns its own CollectorRegistry, so several apps (tests) never collide on metric names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("signserve")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLIENT_CLOSED = 499
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CudaMemoryCollector(Collector):
    """torch's CUDA allocator figures, read at scrape time, for each device a model runs on."""

    def __init__(self, devices: Callable[[], Iterable[torch.device]]) -> None:
        self._devices = devices

    def collect(self):
        devices = sorted({d.index or 0 for d in self._devices() if d.type == "cuda"})
        if not devices:
            return
        allocated = GaugeMetricFamily("signserve_cuda_memory_allocated_bytes",
                                      "CUDA memory held by tensors", labels=["device"])
        reserved = GaugeMetricFamily("signserve_cuda_memory_reserved_bytes",
                                     "CUDA memory reserved by torch's caching allocator", labels=["device"])
        peak = GaugeMetricFamily("signserve_cuda_memory_max_allocated_bytes",
                                 "peak CUDA memory held by tensors since start", labels=["device"])
        for index in devices:
            label = [f"cuda:{index}"]
            allocated.add_metric(label, torch.cuda.memory_allocated(index))
            reserved.add_metric(label, torch.cuda.memory_reserved(index))
            peak.add_metric(label, torch.cuda.max_memory_allocated(index))
        yield allocated
        yield reserved
        yield peak


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("signserve_http_requests", "HTTP requests by route template and status",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("signserve_http_request_duration_seconds",
                                       "HTTP request latency, first byte in to last byte out",
                                       ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.prediction_duration = Histogram("signserve_prediction_duration_seconds",
                                             "latency of the model stage of a predict request: queue wait "
                                             "plus forward pass, for all its images", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.forward_duration = Histogram("signserve_forward_duration_seconds", "one batched forward pass",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("signserve_batch_size", "images per forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("signserve_queue_depth", "images waiting for a forward pass", ["model"],
                                 registry=r)
        self.images_classified = Counter("signserve_images_classified", "images classified", ["model"],
                                         registry=r)
        self.queue_rejections = Counter("signserve_queue_rejections",
                                        "predict requests answered 503 because the queue was full",
                                        ["model"], registry=r)
        self.model_load_seconds = Gauge("signserve_model_load_seconds",
                                        "time to load and warm up a model at start-up", ["model"], registry=r)
        self.model_info = Gauge("signserve_model_info", "the models served (value 1)",
                                ["model", "architecture", "device", "checkpoint_sha256", "backend", "precision"],
                                registry=r)
        self._info_labels: dict[str, list[tuple[str, ...]]] = {}
        self._cuda_devices: list[torch.device] = []
        r.register(CudaMemoryCollector(lambda: self._cuda_devices))

    def show_backend(self, name: str, model, backend) -> None:
        """signserve_model_info for model `name` on `backend` (a swapped-out runtime's series goes)."""
        for labels in list(self._info_labels.get(name, [])):
            self.model_info.remove(*labels)
        labels = (name, model.architecture, str(model.device), model.sha256, backend.backend, backend.precision)
        self.model_info.labels(*labels).set(1)
        self._info_labels[name] = [labels]

    def watch_device(self, device: torch.device) -> None:
        if device.type == "cuda" and device not in self._cuda_devices:
            self._cuda_devices.append(device)

    def batch_observer(self, model: str) -> Callable[[int, float], None]:
        batch_size = self.batch_size.labels(model)
        forward = self.forward_duration.labels(model)
        images = self.images_classified.labels(model)

        def observe(size: int, seconds: float) -> None:
            batch_size.observe(size)
            forward.observe(seconds)
            images.inc(size)

        return observe


class PrometheusMiddleware:
    """Counts and times every HTTP request by method, route template (not raw path) and status; a client
    that disconnected before its request was read is counted as status 499 (nginx's "client closed
    request") and logged in one line, not as a 500 with a traceback."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before starting a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except ClientDisconnect:
            # The client went away before its request was read: nothing to answer, nothing broken.
            status = CLIENT_CLOSED
            client = scope.get("client") or ("?", 0)
            log.info("client %s:%s disconnected during %s %s after %.2f s", client[0], client[1], scope["method"],
                     scope["path"], time.perf_counter() - started)
        finally:
            route = scope.get("route")
            # unmatched paths share one label, so scanners cannot blow up the label cardinality
            template = getattr(route, "path", None) or "unmatched"
            labels = (scope["method"], template, str(status))
            self.metrics.http_requests.labels(*labels).inc()
            self.metrics.http_duration.labels(*labels).observe(time.perf_counter() - started)
