"""Explanations the handlers serve on /explanations/<model>: Integrated Gradients (Captum) for the
classifiers, and the translator's cross-attention alignment (models/transformer.py).

Integrated Gradients (Sundararajan et al., 2017) integrates the gradient of the predicted class's
logit along a straight path from a baseline to the input; the attributions add up to the logit's
change from baseline to input. Its cost is ``steps`` forward and backward passes per input, bounded
by each model config's ``explain_steps``.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image


def image_attributions(model, x: torch.Tensor, target: torch.Tensor, baseline: float, steps: int) -> torch.Tensor:
    """Integrated Gradients of ``target``'s logit over each input pixel: x (B, C, H, W) -> (B, C, H, W).

    The baseline is a uniform image of value ``baseline`` (the normalised black image): pixels equal
    to it (the background of a drawn digit) get exactly zero."""
    from captum.attr import IntegratedGradients

    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        ig = IntegratedGradients(model)
        return ig.attribute(
            x, baselines=torch.full_like(x, baseline), target=target, n_steps=steps, internal_batch_size=len(x) * steps
        ).detach()


def token_attributions(
    model, layer: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor, baseline_id: int, steps: int
) -> torch.Tensor:
    """Layer Integrated Gradients over the embedding ``layer``, summed per token: ids (B, T) -> (B, T).

    The baseline replaces every token by ``baseline_id`` (e.g. <unk>) and keeps the padding, so the
    sequence lengths stay the input's."""
    from captum.attr import LayerIntegratedGradients

    pad = getattr(model.config, "pad_id", 0)
    baseline = torch.where(ids == pad, ids, torch.full_like(ids, baseline_id))
    with torch.inference_mode(False), torch.enable_grad():
        lig = LayerIntegratedGradients(model, layer)
        attr = lig.attribute(ids.clone(), baselines=baseline, target=target, n_steps=steps)
        return attr.sum(-1).detach() * (ids != pad)


def heatmap_png(pixels: np.ndarray, attr: np.ndarray, scale: int = 8) -> str:
    """A base64 PNG: the input in grey, positive attribution in red, negative in blue."""
    grey = pixels.astype(np.float32) / 255.0 * 0.5
    peak = float(np.abs(attr).max()) or 1.0
    pos, neg = np.clip(attr / peak, 0, 1), np.clip(-attr / peak, 0, 1)
    rgb = np.stack([grey + pos, grey, grey + neg], axis=-1)
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
