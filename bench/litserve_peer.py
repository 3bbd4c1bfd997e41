"""The same checkpoint served by LitServe, the peer people compare signserve with: its own dynamic
batching (up to the service's batch size, a 5 ms window), one inference worker with every core's
torch threads, the same decoding, preprocessing and NHWC eager forward as signserve's torch backend.

    BENCH_CHECKPOINT=models/checkpoints/cnn.pt python -m bench.litserve_peer PORT

`make bench` installs LitServe (the `bench` extra) and measures this next to the service.
"""

from __future__ import annotations

import io
import os
import sys

import litserve as ls
import torch
from PIL import Image

from models.checkpoint import load_checkpoint
from models.preprocessing import image_to_uint8, normalize

MAX_BATCH_SIZE = int(os.environ.get("BENCH_MAX_BATCH_SIZE", 16))
BATCH_TIMEOUT_S = 0.005


class SignAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.loaded = load_checkpoint(os.environ["BENCH_CHECKPOINT"], device=device)
        self.model = self.loaded.model.to(memory_format=torch.channels_last).eval()

    def decode_request(self, request) -> torch.Tensor:  # LitServe passes the parsed form
        with Image.open(io.BytesIO(request["file"].file.read())) as image:
            return image_to_uint8(image, self.loaded.preprocessing)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.loaded.device), self.loaded.preprocessing)
        return self.model(x.contiguous(memory_format=torch.channels_last)).softmax(1).cpu()

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probabilities: torch.Tensor) -> dict:
        values, ids = probabilities.topk(5)
        return {"model": self.loaded.name, "results": [{"predictions": [
            {"class_id": c, "label": self.loaded.class_names[c], "probability": p}
            for c, p in zip(ids.tolist(), values.tolist())]}]}


def main() -> None:
    port = int(sys.argv[1])
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    api = SignAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/v1/predict")
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
