"""Call TorchServe over REST or gRPC with the same calls and the same typed errors.

  python -m scripts.client predict cnn --file digit.png
  python -m scripts.client --transport grpc predict lstm --text "a warm, funny film"
  python -m scripts.client predict transformer --json '{"text": "God is love.", "max_length": 12}'
  python -m scripts.client explain cnn --file digit.png --heatmap explain-cnn.png    # make explain
  python -m scripts.client health | models | describe lstm | scale lstm --min 1 --max 2 | metrics

As a library:

  from scripts.client import Client
  with Client(transport="grpc") as c:
      c.predict("lstm", {"text": "a warm, funny film"})

Host, ports, timeout and tokens are arguments, defaulting to the environment (TS_HOST,
TS_INFERENCE_PORT, TS_MANAGEMENT_PORT, TS_METRICS_PORT, TS_GRPC_INFERENCE_PORT,
TS_GRPC_MANAGEMENT_PORT, TS_TIMEOUT, TS_INFERENCE_TOKEN, TS_MANAGEMENT_TOKEN, TS_KEY_FILE,
TS_GRPC_TARGET, TS_GRPC_LB) and then to `make serve`'s defaults; tokens are read from the key file of
`make serve`'s run directory.

gRPC on Kubernetes: a ClusterIP Service balances connections, and one gRPC channel is one long-lived
connection, so every request of a client goes to one pod. Give the group's headless Service as the
target with per-request balancing over the pods its DNS name lists:

  python -m scripts.client --transport grpc --grpc-lb round_robin \
      --grpc-target dns:///ts-torchserve-models-lstm-grpc.ml-serving.svc.cluster.local:7070 predict lstm --text hi
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .common import ROOT, CLIError, run_cli
from .serve import PORTS

GEN_DIR = ROOT / "scripts" / "grpc_gen"


# ----------------------------------------------------------------------------- typed errors


# What the socket said under a requests ConnectionError: refused, no route, reset, closed unanswered.
_REASON = re.compile(r"\[Errno -?\d+\] [A-Za-z ]+|RemoteDisconnected|Connection reset by peer|Connection aborted")


def _reason(e: Exception) -> str:
    m = _REASON.search(str(e))
    return f": {m.group(0).strip()}" if m else ""


class ClientError(CLIError):
    """Base of every error the client raises; ``status`` is the HTTP-style code when there is one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ModelNotFound(ClientError):
    """No such model or version (404)."""


class BadInput(ClientError):
    """The handler refused this request (4xx), with its one-line reason."""


class Unauthorized(ClientError):
    """Missing, wrong or expired token (TorchServe answers 400 with InvalidKeyException)."""


class Overloaded(ClientError):
    """The model's queue is full or it has no worker to take the request (503)."""


class Timeout(ClientError):
    """No answer within the client's timeout."""


class ServerError(ClientError):
    """The server failed the request (5xx), e.g. a worker died mid-request ("Worker died.")."""


def error_for_status(status: int, message: str) -> ClientError:
    """The typed error for an HTTP status and TorchServe's message (raw HTTP clients use it too)."""
    if status == 404:
        return ModelNotFound(message, status)
    if "InvalidKeyException" in message or "Token Authorization failed" in message:
        return Unauthorized(message, status)
    if 400 <= status < 500:
        return BadInput(message, status)
    if status == 503:
        return Overloaded(message, status)
    return ServerError(message, status)


def _handler_error(payload: bytes) -> ClientError | None:
    """A handler's per-request error body ({"code": 4xx, "type", "message"}), else None."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and set(body) == {"code", "type", "message"} and isinstance(body["code"], int):
        return error_for_status(body["code"], f"{body['code']} {body['type']}: {body['message']}")
    return None


# ----------------------------------------------------------------------------- settings


def _env_port(name: str) -> int:
    return int(os.environ.get(f"TS_{name.upper()}_PORT", PORTS[name]))


@dataclass
class Settings:
    host: str = field(default_factory=lambda: os.environ.get("TS_HOST", "127.0.0.1"))
    ports: dict[str, int] = field(default_factory=lambda: {k: _env_port(k) for k in PORTS})
    timeout: float = field(default_factory=lambda: float(os.environ.get("TS_TIMEOUT", "30")))
    inference_token: str | None = field(default_factory=lambda: os.environ.get("TS_INFERENCE_TOKEN"))
    management_token: str | None = field(default_factory=lambda: os.environ.get("TS_MANAGEMENT_TOKEN"))
    key_file: Path | None = field(
        default_factory=lambda: Path(os.environ.get("TS_KEY_FILE", ROOT / "run" / "key_file.json"))
    )
    # gRPC inference target in gRPC's own syntax (dns:///name:port, ipv4:a:p,b:p, host:port); default host:port.
    grpc_target: str | None = field(default_factory=lambda: os.environ.get("TS_GRPC_TARGET") or None)
    # gRPC load-balancing policy over the target's addresses: pick_first (gRPC's default) or round_robin.
    grpc_lb: str = field(default_factory=lambda: os.environ.get("TS_GRPC_LB", "pick_first"))
    # The name the server knows itself by, sent as HTTP's Host and gRPC's :authority when the
    # address called is another (a Service's IP, a port-forward): a serverless group's revision,
    # <revision>.<namespace>.svc.cluster.local, which Knative's activator routes on.
    authority: str | None = field(default_factory=lambda: os.environ.get("TS_AUTHORITY") or None)

    def token(self, api: str) -> str | None:
        """Explicit token, else the current key from the key file (re-read: keys rotate)."""
        explicit = self.inference_token if api == "inference" else self.management_token
        if explicit is not None:
            return explicit or None
        if self.key_file and self.key_file.is_file():
            try:
                return json.loads(self.key_file.read_text())[api]["key"]
            except (ValueError, KeyError):
                return None
        return None


def encode_payload(data: Any) -> tuple[bytes, str]:
    """A payload and its content type: dict/list -> JSON, str -> UTF-8 text, bytes unchanged."""
    if isinstance(data, (dict, list)):
        return json.dumps(data).encode(), "application/json"
    if isinstance(data, str):
        return data.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(data, (bytes, bytearray)):
        return bytes(data), "application/octet-stream"
    raise TypeError(f"payload must be bytes, str, dict or list, not {type(data).__name__}")


# ----------------------------------------------------------------------------- transports


class RestTransport:
    def __init__(self, s: Settings):
        self.s = s
        self.http = requests.Session()

    def _url(self, api: str, path: str) -> str:
        return f"http://{self.s.host}:{self.s.ports[api]}{path}"

    def _call(self, method: str, api: str, path: str, token_api: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if self.s.authority and api == "inference":
            headers["Host"] = self.s.authority
        token = self.s.token(token_api or api)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            resp = self.http.request(method, self._url(api, path), headers=headers, timeout=self.s.timeout, **kw)
        except requests.Timeout:
            raise Timeout(f"{method} {path}: no answer within {self.s.timeout}s") from None
        except requests.ConnectionError as e:
            raise ServerError(
                f"{method} {self._url(api, path)}: cannot connect ({type(e).__name__}{_reason(e)}); is the server running?"
            ) from None
        if resp.status_code >= 400:
            raise _handler_error(resp.content) or error_for_status(resp.status_code, _message(resp))
        return resp

    def health(self) -> dict:
        return self._call("GET", "inference", "/ping").json()

    def list_models(self) -> list[dict]:
        return self._call("GET", "management", "/models", params={"limit": 1000}).json()["models"]

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        return self._call("GET", "management", f"/models/{model}" + (f"/{version}" if version else "")).json()

    def predict(
        self, model: str, data: Any, version: str | None = None, api: str = "predictions"
    ) -> tuple[bytes, dict]:
        body, ctype = encode_payload(data)
        path = f"/{api}/{model}" + (f"/{version}" if version else "")
        resp = self._call("POST", "inference", path, data=body, headers={"Content-Type": ctype})
        return resp.content, dict(resp.headers)

    def scale(self, model: str, min_workers: int, max_workers: int, version: str | None = None) -> str:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        return self._call("PUT", "management", path, params=params).json().get("status", "")

    def metrics(self) -> str:
        return self._call("GET", "metrics", "/metrics").text

    def close(self) -> None:
        self.http.close()


def _message(resp: requests.Response) -> str:
    try:
        body = resp.json()
        return f"{resp.status_code} {body.get('type', '')}: {body.get('message', resp.text)}".strip()
    except ValueError:
        return f"{resp.status_code}: {resp.text.strip()[:200] or resp.reason}"


class GrpcTransport:
    def __init__(self, s: Settings):
        import grpc

        if not (GEN_DIR / "inference_pb2_grpc.py").is_file():
            raise CLIError("gRPC stubs are missing; run `make protos`")
        if str(GEN_DIR) not in sys.path:
            sys.path.insert(0, str(GEN_DIR))  # the generated modules import each other top-level
        import inference_pb2
        import inference_pb2_grpc
        import management_pb2
        import management_pb2_grpc

        self.grpc, self.s = grpc, s
        self.inf_pb, self.mgmt_pb = inference_pb2, management_pb2
        target = s.grpc_target or f"{s.host}:{s.ports['grpc_inference']}"
        # Each client's channels own their connections (gRPC otherwise shares them between channels
        # of one target): a new client, as after a failure, connects anew, and a connection to a
        # pod on a lost node (no reset ever comes back) is not handed to it again.
        own = [("grpc.use_local_subchannel_pool", 1)]
        authority = [("grpc.default_authority", s.authority)] if s.authority else []
        self.inf_ch = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", s.grpc_lb), *own, *authority])
        self.mgmt_ch = grpc.insecure_channel(f"{s.host}:{s.ports['grpc_management']}", options=own)
        self.inf = inference_pb2_grpc.InferenceAPIsServiceStub(self.inf_ch)
        self.mgmt = management_pb2_grpc.ManagementAPIsServiceStub(self.mgmt_ch)

    def _call(self, fn, request, api: str, what: str):
        token = self.s.token(api)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            return fn(request, timeout=self.s.timeout, metadata=metadata)
        except self.grpc.RpcError as e:
            raise self._error(e, what) from None

    def _error(self, e, what: str) -> ClientError:
        code = e.code()
        detail = (e.details() or "").splitlines()[0] if e.details() else ""  # drop the Java class line
        C = self.grpc.StatusCode
        msg = f"{what}: {code.name} {detail}".strip()
        if code == C.DEADLINE_EXCEEDED:
            return Timeout(f"{what}: no answer within {self.s.timeout}s")
        if "Token Authorization failed" in detail or code == C.UNAUTHENTICATED:
            return Unauthorized(msg, 400)
        if code == C.NOT_FOUND or "not found" in detail.lower() or "does not exist" in detail.lower():
            return ModelNotFound(msg, 404)
        if code == C.UNAVAILABLE and ("connect" in detail.lower() or "unreachable" in detail.lower()):
            return ServerError(f"{what}: cannot connect to {self.s.host}; is the server running? ({detail})")
        if "Worker died" in detail:  # gRPC says INTERNAL or RESOURCE_EXHAUSTED for it: not an overload
            return ServerError(msg, 500)
        if code == C.RESOURCE_EXHAUSTED or (code == C.UNAVAILABLE and "queue" in detail.lower()):
            return Overloaded(msg, 503)
        if code == C.INVALID_ARGUMENT:
            return BadInput(msg, 400)
        return ServerError(msg, 500)

    def health(self) -> dict:
        from google.protobuf import empty_pb2

        resp = self._call(self.inf.Ping, empty_pb2.Empty(), "inference", "ping")
        return json.loads(resp.health)

    def list_models(self) -> list[dict]:
        # ListModels answers nothing without a limit (measured on 0.12).
        resp = self._call(self.mgmt.ListModels, self.mgmt_pb.ListModelsRequest(limit=1000), "management", "list models")
        return json.loads(resp.msg)["models"]

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        req = self.mgmt_pb.DescribeModelRequest(model_name=model, model_version=version or "")
        return json.loads(self._call(self.mgmt.DescribeModel, req, "management", f"describe {model}").msg)

    def predict(self, model: str, data: Any, version: str | None = None) -> tuple[bytes, dict]:
        body, _ = encode_payload(data)
        req = self.inf_pb.PredictionsRequest(model_name=model, model_version=version or "", input={"data": body})
        resp = self._call(self.inf.Predictions, req, "inference", f"predict {model}")
        # A handler's per-request 4xx arrives as gRPC OK with the error in the payload.
        err = _handler_error(resp.prediction)
        if err is not None:
            raise err
        return resp.prediction, {}

    def scale(self, model: str, min_workers: int, max_workers: int, version: str | None = None) -> str:
        req = self.mgmt_pb.ScaleWorkerRequest(
            model_name=model,
            model_version=version or "",
            min_worker=min_workers,
            max_worker=max_workers,
            synchronous=True,
        )
        return json.loads(self._call(self.mgmt.ScaleWorker, req, "management", f"scale {model}").msg).get("status", "")

    def metrics(self) -> str:
        return RestTransport(self.s).metrics()  # metrics are plain HTTP only

    def close(self) -> None:
        self.inf_ch.close()
        self.mgmt_ch.close()


class Client:
    """Both transports behind the same calls; ``predict`` returns the decoded JSON answer."""

    def __init__(self, transport: str = "rest", settings: Settings | None = None, **overrides):
        self.settings = settings or Settings()
        for key, value in overrides.items():
            if value is not None:
                setattr(self.settings, key, value)
        if transport not in ("rest", "grpc"):
            raise CLIError(f"transport must be rest or grpc, not {transport!r}")
        self.kind = transport
        self.transport = RestTransport(self.settings) if transport == "rest" else GrpcTransport(self.settings)
        self.last_headers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.transport.close()

    def health(self) -> dict:
        return self.transport.health()

    def list_models(self) -> list[dict]:
        return self.transport.list_models()

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        return self.transport.describe(model, version)

    def predict(self, model: str, data: Any, version: str | None = None) -> Any:
        raw, self.last_headers = self.transport.predict(model, data, version)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return raw

    def explain(self, model: str, data: Any, version: str | None = None, **options) -> Any:
        """Why the model answered as it did (handlers/explain.py): per-pixel or per-token attributions,
        or the translator's alignment. ``data`` as for predict; ``options`` go into the JSON body
        (cnn: ``heatmap=True``). REST calls /explanations/<model>; over gRPC, whose TorchServe API has
        no explanations call, the body says "explain": true."""
        if isinstance(data, (bytes, bytearray)):
            doc = {"data": base64.b64encode(bytes(data)).decode()}
        elif isinstance(data, str):
            doc = {"text": data}
        else:
            doc = dict(data)
        doc.update(options)
        if self.kind == "rest":
            raw, self.last_headers = self.transport.predict(model, doc, version, api="explanations")
        else:
            raw, self.last_headers = self.transport.predict(model, {**doc, "explain": True}, version)
        return json.loads(raw)

    def predict_file(self, model: str, path: str | Path, version: str | None = None) -> Any:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CLIError(f"{path}: {e.strerror}") from None
        return self.predict(model, data, version)

    def scale(self, model: str, min_workers: int, max_workers: int, version: str | None = None) -> str:
        return self.transport.scale(model, min_workers, max_workers, version)

    def metrics(self) -> str:
        return self.transport.metrics()


# ----------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--transport",
        choices=["rest", "grpc"],
        default=os.environ.get("TS_TRANSPORT", "rest"),
        help="protocol (default: $TS_TRANSPORT or rest)",
    )
    p.add_argument("--host", default=None, help="server address (default: $TS_HOST or 127.0.0.1)")
    for name, default in PORTS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}-port",
            type=int,
            default=None,
            help=f"(default: $TS_{name.upper()}_PORT or {default})",
        )
    p.add_argument("--timeout", type=float, default=None, help="seconds per call (default: $TS_TIMEOUT or 30)")
    p.add_argument("--token", default=None, help="inference token (default: $TS_INFERENCE_TOKEN or the key file)")
    p.add_argument(
        "--management-token", default=None, help="management token (default: $TS_MANAGEMENT_TOKEN or the key file)"
    )
    p.add_argument(
        "--key-file", type=Path, default=None, help="TorchServe key file (default: $TS_KEY_FILE or run/key_file.json)"
    )
    p.add_argument(
        "--grpc-target",
        default=None,
        help="gRPC inference target, e.g. dns:///<group>-grpc.<ns>.svc.cluster.local:7070 (default: $TS_GRPC_TARGET or host:port)",
    )
    p.add_argument(
        "--grpc-lb",
        choices=["pick_first", "round_robin"],
        default=None,
        help="gRPC load balancing over the target's addresses (default: $TS_GRPC_LB or pick_first)",
    )
    p.add_argument(
        "--authority",
        default=None,
        help="the server's name, as HTTP Host and gRPC :authority, when --host or --grpc-target is another address,"
        " e.g. <revision>.<ns>.svc.cluster.local for a serverless group (default: $TS_AUTHORITY)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="GET /ping (or gRPC Ping)")
    sub.add_parser("models", help="list the registered models")
    d = sub.add_parser("describe", help="a model's versions and workers")
    d.add_argument("model")
    d.add_argument("--version", default=None, help="model version (default: all)")
    pr = sub.add_parser("predict", help="send one input to a model")
    pr.add_argument("model")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="send this file's bytes (an image, a text file)")
    src.add_argument("--text", help="send this text")
    src.add_argument("--json", help="send this JSON document")
    pr.add_argument("--version", default=None, help="model version (default: the server's default version)")
    ex = sub.add_parser("explain", help="why the model answered as it did (attributions or alignment)")
    ex.add_argument("model")
    exsrc = ex.add_mutually_exclusive_group(required=True)
    exsrc.add_argument("--file", type=Path, help="explain this file's bytes (an image)")
    exsrc.add_argument("--text", help="explain this text")
    ex.add_argument("--heatmap", type=Path, default=None, help="cnn: write the attribution heatmap PNG here")
    sc = sub.add_parser("scale", help="set a model's worker count")
    sc.add_argument("model")
    sc.add_argument("--min", type=int, required=True, help="minimum workers")
    sc.add_argument("--max", type=int, required=True, help="maximum workers")
    m = sub.add_parser("metrics", help="scrape the Prometheus metrics")
    m.add_argument("--grep", default=None, help="only lines containing this text (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    s = Settings()
    if args.host:
        s.host = args.host
    for name in PORTS:
        if getattr(args, f"{name}_port") is not None:
            s.ports[name] = getattr(args, f"{name}_port")
    if args.timeout is not None:
        s.timeout = args.timeout
    if args.token is not None:
        s.inference_token = args.token
    if args.management_token is not None:
        s.management_token = args.management_token
    if args.key_file is not None:
        s.key_file = args.key_file
    if args.authority is not None:
        s.authority = args.authority
    if args.grpc_target is not None:
        s.grpc_target = args.grpc_target
    if args.grpc_lb is not None:
        s.grpc_lb = args.grpc_lb
    with Client(args.transport, s) as c:
        if args.command == "health":
            out = c.health()
        elif args.command == "models":
            out = c.list_models()
        elif args.command == "describe":
            out = c.describe(args.model, args.version)
        elif args.command == "predict":
            if args.file is not None:
                out = c.predict_file(args.model, args.file, args.version)
            elif args.json is not None:
                try:
                    doc = json.loads(args.json)
                except ValueError as e:
                    raise CLIError(f"--json is not valid JSON: {e}") from None
                out = c.predict(args.model, doc, args.version)
            else:
                out = c.predict(args.model, args.text, args.version)
        elif args.command == "explain":
            if args.file is not None:
                try:
                    data = args.file.read_bytes()
                except OSError as e:
                    raise CLIError(f"{args.file}: {e.strerror}") from None
            else:
                data = args.text
            out = c.explain(args.model, data, **({"heatmap": True} if args.heatmap else {}))
            if args.heatmap:
                if "heatmap_png" not in out:
                    raise CLIError(f"{args.model} answered no heatmap (only the image classifier draws one)")
                args.heatmap.write_bytes(base64.b64decode(out.pop("heatmap_png")))
                print(f"wrote {args.heatmap}", file=sys.stderr)
            if "attributions" in out:  # 28 rows of 28 numbers: the picture says it better
                out["attributions"] = f"{len(out['attributions'])}x{len(out['attributions'][0])} values"
        elif args.command == "scale":
            out = c.scale(args.model, args.min, args.max)
        else:
            text = c.metrics()
            print("\n".join(line for line in text.splitlines() if args.grep is None or args.grep in line))
            return 0
    print(json.dumps(out, indent=2, ensure_ascii=False) if not isinstance(out, (bytes, str)) else out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("client", main))
