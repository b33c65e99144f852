"""TorchServe handler for the CNN image classifier.

Accepts per request: PNG/JPEG/... bytes (raw body or multipart field), a base64 string (or data
URL), or JSON {"data": <base64>, "topk": k}. Any size and colour mode is converted to grayscale
28x28 with the training normalisation. Answers {label: probability} for the top k labels.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers.base import CheckpointHandler, InvalidInput, PayloadTooLarge, b64decode, positive_int
from models.image import normalize, pil_to_array


class ImageClassifierHandler(CheckpointHandler):
    task = "image-classification"
    defaults = {
        "topk": 3,  # labels returned when the request does not ask
        "max_bytes": 10 * 1024 * 1024,  # encoded image size limit
        "max_pixels": 4096 * 4096,  # decoded size limit: refuses decompression bombs before decoding
        "invert_light": True,  # invert dark-on-light images to MNIST's light-on-dark
        # NHWC tensors: convolutions and pooling ran 1.5-2x faster than NCHW on CPU
        # (docs/performance.md). Ignored by the aoti variant, which keeps the layout it was compiled for.
        "channels_last": True,
        "explain_steps": 32,  # Integrated Gradients steps per explained image (its cost: steps x a forward+backward)
    }

    def setup(self, ckpt: dict) -> None:
        self.labels = list(ckpt["labels"])
        pre = ckpt["preprocess"]
        self.mean, self.std, self.size = pre["mean"], pre["std"], pre["image_size"]
        self.memory_format = torch.contiguous_format
        if self.options["channels_last"] and self.options["optimize"] != "aoti":
            self.memory_format = torch.channels_last
            self.model = self.model.to(memory_format=self.memory_format)

    def parse(self, payload: Any):
        topk, heatmap = self.options["topk"], False
        if isinstance(payload, dict):
            unknown = set(payload) - {"data", "topk", "heatmap"}
            if "data" not in payload or unknown:
                raise InvalidInput(
                    'JSON body must be {"data": <base64 image>, "topk": <int, optional>, "heatmap": <bool, optional>}'
                )
            if "topk" in payload:
                topk = positive_int(payload["topk"], "topk", len(self.labels))
            heatmap = payload.get("heatmap", False)
            if not isinstance(heatmap, bool):
                raise InvalidInput("'heatmap' must be true or false")
            payload = payload["data"]
            if not isinstance(payload, str):
                raise InvalidInput("'data' must be a base64 string")
        if isinstance(payload, str):
            payload = b64decode(payload)
        elif isinstance(payload, (bytes, bytearray)) and not _looks_like_image(payload):
            payload = b64decode(bytes(payload).strip())  # base64 sent as a raw body
        elif not isinstance(payload, (bytes, bytearray)):
            raise InvalidInput(f"expected an image, got JSON {type(payload).__name__}")
        return [(self.decode_image(bytes(payload)), topk, heatmap)], False

    def decode_image(self, raw: bytes) -> np.ndarray:
        if not raw:
            raise InvalidInput("empty image")
        if len(raw) > self.options["max_bytes"]:
            raise PayloadTooLarge(f"image is {len(raw)} bytes, the limit is {self.options['max_bytes']}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(raw)) as img:
                    w, h = img.size  # read from the header, before any pixel is decoded
                    if w * h > self.options["max_pixels"]:
                        raise PayloadTooLarge(f"image is {w}x{h} pixels, the limit is {self.options['max_pixels']}")
                    img.load()
                    return pil_to_array(img, self.size, self.options["invert_light"])
        except InvalidInput:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from None
        except Exception as e:  # noqa: BLE001 - a decoder can raise anything (a fuzzer found NotImplementedError)
            raise InvalidInput(f"not a readable image ({type(e).__name__})") from None

    def preprocess(self, items):
        x = normalize(np.stack([pixels for pixels, _, _ in items]), self.mean, self.std)
        return torch.from_numpy(x).to(self.device).contiguous(memory_format=self.memory_format)

    def inference(self, batch, items=None):
        return torch.softmax(self.model(batch).float(), dim=-1)

    def postprocess(self, probs, items=None):
        # One top-k for the batch and one copy to Python: per-row tensor calls cost more than the work.
        p, idx = probs.topk(max(k for _, k, _ in items), dim=-1)
        return [
            {self.labels[i]: round(v, 6) for v, i in zip(pr[:k], ir[:k], strict=True)}
            for pr, ir, (_, k, _) in zip(p.cpu().tolist(), idx.cpu().tolist(), items, strict=True)
        ]

    def explain_items(self, items):
        """The predicted label, and Integrated Gradients of its logit per pixel (28x28, the model's
        input), plus a PNG heatmap (base64) when the request sets "heatmap": true."""
        from handlers.explain import heatmap_png, image_attributions

        self.explanation_allowed()
        x = self.preprocess(items)
        with torch.inference_mode():
            probs = self.inference(x)
        target = probs.argmax(-1)
        black = (0.0 - self.mean) / self.std  # the baseline: a black image, normalised like the inputs
        attr = image_attributions(self.model, x, target, black, self.options["explain_steps"])[:, 0].cpu().numpy()
        out = []
        for (pixels, _, heatmap), t, p, a in zip(items, target.tolist(), probs.cpu(), attr, strict=True):
            answer = {
                "label": self.labels[t],
                "probability": round(float(p[t]), 6),
                "method": f"integrated gradients, {self.options['explain_steps']} steps, black baseline",
                "attributions": np.round(a, 5).tolist(),
            }
            if heatmap:
                answer["heatmap_png"] = heatmap_png(pixels, a)
            out.append(answer)
        return out


_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"P5", b"P6")


def _looks_like_image(raw: bytes) -> bool:
    return raw.startswith(_MAGIC)
