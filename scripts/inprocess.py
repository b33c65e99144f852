"""Run a handler in-process, the way a TorchServe worker does, without a server.

TorchServe's own Context and RequestProcessor classes carry the request headers and collect the
per-request statuses; used by the tests and by the benchmark's in-process limit.
"""

from __future__ import annotations

import json

from . import registry


def make_context(
    model: str, model_dir, handler_overrides: dict | None = None, batch_size: int = 8, gpu: int | None = None
):
    """TorchServe's own Context and RequestProcessor classes, as a worker builds them. ``gpu``: the
    GPU the worker is given (TorchServe's gpu_id), None for a CPU worker."""
    from ts.context import Context

    config = registry.get(model).model_config()
    config["handler"] = {**config.get("handler", {}), **(handler_overrides or {})}
    manifest = {"model": {"modelName": model, "modelVersion": "1.0", "serializedFile": "checkpoint.pt"}}
    ctx = Context(model, str(model_dir), manifest, batch_size, gpu, "0.12.0", model_yaml_config=config)
    return ctx


def run_batch(handler, ctx, requests: list[dict], request_headers: list[dict] | None = None):
    """Run one batch the way a worker does; returns (answers, [(status, phrase), ...], headers)."""
    from ts.context import RequestProcessor

    ctx.request_processor = [RequestProcessor(h) for h in (request_headers or [{} for _ in requests])]
    raw = handler.handle(requests, ctx)
    if not isinstance(raw, list) or len(raw) != len(requests) or not all(isinstance(r, bytes) for r in raw):
        raise RuntimeError("handle() must return one UTF-8 JSON answer (bytes) per request")
    answers = [json.loads(r) for r in raw]
    statuses = [ctx.get_response_status(i) for i in range(len(requests))]
    headers = [ctx.get_response_headers(i) for i in range(len(requests))]
    return answers, statuses, headers


def load_handler(model: str, checkpoint_path, handler_overrides: dict | None = None, gpu: int | None = None):
    handler = registry.get(model).handler_class()()
    ctx = make_context(model, checkpoint_path.parent, handler_overrides, gpu=gpu)
    handler.initialize(ctx)
    return handler, ctx
