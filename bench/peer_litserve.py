"""The peer /generate: the same models behind a minimal LitServe server, as a user would write
it instead of running this project (LitAPI, max_batch_size 64, the project's own sampler,
decoder and PNG writer, the model's guided sampling defaults: the same work per image).

    python bench/peer_litserve.py --port 8100 [--checkpoint checkpoints/mnist]

Answers POST /predict with {"label": int, "seed": int} -> image/png. Not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls
import torch
from fastapi import Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.checkpoint import load_bundle  # noqa: E402
from models.sampling import SamplingBatch, make_batch  # noqa: E402
from models.slots import sample  # noqa: E402
from service.png import png_bytes  # noqa: E402


class GenerateAPI(ls.LitAPI):
    def __init__(self, checkpoint: str) -> None:
        super().__init__(max_batch_size=64, batch_timeout=0.002)
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.checkpoint, device="cpu")
        self.gpt, self.vq = bundle.gpt.eval(), bundle.vqvae.eval()
        defaults = bundle.config.get("sampling_defaults") or {}
        self.settings = {k: defaults[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")
                         if k in defaults}

    def decode_request(self, request: dict) -> SamplingBatch:
        g = torch.Generator().manual_seed(int(request.get("seed", 0)))
        cfg = self.gpt.config
        return make_batch(cfg, 1, cfg.grid, label=request.get("label"), generator=g,
                          **self.settings)

    def batch(self, inputs: list[SamplingBatch]) -> SamplingBatch:
        return SamplingBatch.cat(inputs)

    @torch.inference_mode()
    def predict(self, batch: SamplingBatch):
        grid = self.gpt.config.grid
        tokens = sample(self.gpt, batch, grid)
        return self.vq.decode_pixels(tokens.view(-1, *grid)).numpy()

    def unbatch(self, output):
        return list(output)

    def encode_response(self, image) -> Response:
        return Response(png_bytes(image), media_type="image/png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mnist"))
    args = ap.parse_args()
    server = ls.LitServer(GenerateAPI(args.checkpoint), accelerator="cpu", workers_per_device=1,
                          timeout=120)
    server.run(port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
