"""What the three TorchServe handlers share.

The stages follow TorchServe's BaseHandler contract (initialize / preprocess / inference /
postprocess) with one change: bad input is handled per request. ``parse`` validates one request
and raises ``InvalidInput``; that request gets its own 4xx via ``context.set_response_status``
while the rest of the batch goes through one forward pass together. No exception escapes
``handle`` for bad input, so a bad request never fails its neighbours or kills the worker.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import json
import logging
import os
import time
import warnings
from typing import Any, NamedTuple

import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from handlers import checkpoint

logger = logging.getLogger(__name__)

AOTI_PACKAGE = "model.pt2"  # the compiled forward in an aoti archive (scripts/archive.py compile_aoti)


MAX_MESSAGE = 300  # characters of an error message; a message may quote what the client sent


def safe_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as short printable ASCII.

    The message becomes the response's reason phrase, which TorchServe 0.12 frames by its length
    in characters but sends as UTF-8 bytes: one non-ASCII character misframes the stream and the
    frontend drops the worker with its whole batch. Unbounded, a message quoting a 200 kB JSON key
    made a status line clients reset on."""
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    printable = "".join(c if " " <= c <= "~" else "?" for c in ascii_text)
    return printable if len(printable) <= limit else printable[: limit - 3] + "..."


def _not_per_batch_noise(record: logging.LogRecord) -> bool:
    # TorchServe's worker logs "Backend received inference at: <time>" at INFO for every batch, on
    # its stdout; the frontend parses each such line and writes it again to model_log.log. It says
    # nothing the access log does not, and cost ~0.1 ms of a one-client request.
    return record.msg != "Backend received inference at: %d"


class InvalidInput(ValueError):
    """A request that can't be processed; ``code`` is the HTTP status it gets (4xx).

    Its message is always short printable ASCII (``safe_message``), whatever it quotes."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(safe_message(message))
        self.code = code


class PayloadTooLarge(InvalidInput):
    def __init__(self, message: str):
        super().__init__(message, 413)


class BatchFull(InvalidInput):
    """A legal request that did not fit in this batch's work budget (503: retry). Not the client's
    fault, but answered the same way: alone, at once, with a short ASCII message."""

    def __init__(self, message: str):
        super().__init__(message, 503)


def error_body(exc: InvalidInput) -> dict:
    """The body a failed request gets; clients (REST and gRPC) recognise it by ``code``."""
    return {"code": exc.code, "type": type(exc).__name__, "message": str(exc)}


def request_payload(request: dict) -> Any:
    """The payload of one request, wherever TorchServe put it.

    REST raw body -> "body"; multipart -> the form field ("data" by convention); gRPC -> the
    keys of the input map. JSON bodies arrive decoded, text/* as str, everything else as bytes.
    """
    for key in ("data", "body"):
        if request.get(key) is not None:
            return request[key]
    values = [v for v in request.values() if v is not None and v != b"" and v != ""]
    if len(values) == 1:
        return values[0]
    if not values:
        raise InvalidInput("empty request: send the input as the request body or a 'data' field")
    raise InvalidInput(f"ambiguous request: send one field named 'data', got {_keys(request)}")


def decode_text(payload: Any) -> str:
    if isinstance(payload, (bytes, bytearray)):
        try:
            return bytes(payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"body is not valid UTF-8 text (byte {e.start})") from None
    if isinstance(payload, str):
        return payload
    raise InvalidInput(f"expected text, got JSON {type(payload).__name__}")


def maybe_json(payload: Any) -> Any:
    """Bytes/str that hold a JSON object (gRPC sends JSON as bytes) -> the object; else unchanged."""
    if (
        isinstance(payload, (bytes, bytearray))
        and payload[:1] == b"{"
        or isinstance(payload, str)
        and payload[:1] == "{"
    ):
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("body starts with '{' but is not valid JSON") from None
        except RecursionError:
            raise InvalidInput("JSON body is nested too deeply") from None
    return payload


def b64decode(text: str | bytes, what: str = "data") -> bytes:
    if isinstance(text, str):
        if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        text = text.encode("ascii", "ignore")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"'{what}' is not valid base64") from None


def positive_int(value: Any, name: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"'{name}' must be a positive integer, got {value!r}")
    if value > limit:
        raise InvalidInput(f"'{name}' must be at most {limit}, got {value}")
    return value


def text_field(payload: Any, max_texts: int, extra_keys: frozenset = frozenset()) -> tuple[list[str], bool]:
    """Raw text or {"text": str | [str, ...]} -> (texts, whether a list was sent)."""
    if isinstance(payload, dict):
        unknown = set(payload) - {"text"} - extra_keys
        if "text" not in payload or unknown:
            allowed = ", ".join(repr(k) for k in sorted({"text"} | extra_keys))
            raise InvalidInput(f"JSON body must be an object with the keys {allowed}; got {_keys(payload)}")
        value = payload["text"]
        if isinstance(value, list):
            if not value:
                raise InvalidInput("'text' is an empty list")
            if len(value) > max_texts:
                raise PayloadTooLarge(f"'text' has {len(value)} entries, the limit is {max_texts}")
            if not all(isinstance(v, str) for v in value):
                raise InvalidInput("'text' must be a string or a list of strings")
            return list(value), True
        if not isinstance(value, str):
            raise InvalidInput("'text' must be a string or a list of strings")
        return [value], False
    if isinstance(payload, list):
        raise InvalidInput('send a JSON object {"text": [...]}, not a bare list')
    return [decode_text(payload)], False


class Parsed(NamedTuple):
    """One request of a batch once parsed: where it is, what it asks for, and its work."""

    index: int  # the request's place in the batch
    count: int  # items it holds
    many: bool  # sent as a list (answered as one)
    explain: bool
    items: list
    cost: int  # in the units of CheckpointHandler.budget


class TokenIds(list):
    """A text's token ids, and the words they came from (explanations name the words as sent)."""

    words: list[str]


def _keys(obj: dict, most: int = 5, width: int = 40) -> str:
    """A few of the keys a client sent, each cut short, for an error message."""
    keys = [k if len(k) <= width else k[:width] + "..." for k in sorted(obj)[:most]]
    return f"{keys}" + (f" and {len(obj) - most} more" if len(obj) > most else "")


class CheckpointHandler(BaseHandler):
    """Rebuilds the model from the checkpoint's own config; subclasses define the data path."""

    task: str = ""  # the checkpoint task this handler serves (a checkpoint for another is refused)
    busy_fd: int | None = None  # this worker's busy marker, opened by initialize when TS_BUSY_DIR is set
    # A profiler (scripts/bench.py) sets a StageClock to have the batch path timed stage by stage.
    stages: StageClock | None = None
    work_unit: str = "items"  # what cost() counts, named in the 503 of a full batch
    defaults: dict[str, Any] = {}  # handler options, overridden by model-config.yaml's `handler:`
    common_defaults: dict[str, Any] = {  # options every handler takes
        "cuda_dtype": "float32",  # autocast dtype on CUDA: float32 (off), bfloat16, float16
        "optimize": "none",  # none, int8 (CPU: dynamic quantisation of Linear/LSTM weights) or aoti
        "threads": 0,  # torch intra-op threads per worker; 0 leaves torch's default (one per core)
    }

    def initialize(self, context) -> None:
        try:
            self._initialize(context)
        except Exception:
            # Logged with the traceback, then raised: TorchServe marks the worker failed instead
            # of reporting a model that can't answer as serving.
            logger.exception("%s: initialize failed", type(self).__name__)
            raise

    def _initialize(self, context) -> None:
        self.context = context
        # Each worker keeps a file <TS_BUSY_DIR>/torchserve-busy-<pid> whose first byte is 1 while it
        # runs a batch: TorchServe's describe-model shows queued requests but not the batch a worker
        # is processing, and the preStop drain (scripts/pod.py) must wait for both. The file stays
        # open for the worker's life and only its byte is rewritten: creating and removing a file
        # per batch cost ~0.1 ms of a one-client request.
        root = logging.getLogger()  # the worker's logging.info calls log on the root logger itself
        if _not_per_batch_noise not in root.filters:
            root.addFilter(_not_per_batch_noise)
        busy_dir = os.environ.get("TS_BUSY_DIR")
        if busy_dir:
            path = os.path.join(busy_dir, f"torchserve-busy-{os.getpid()}")
            self.busy_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self.busy_fd, b"0", 0)
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        defaults = {**self.common_defaults, **self.defaults}
        cfg = dict(defaults)
        cfg.update((context.model_yaml_config or {}).get("handler") or {})
        unknown = set(cfg) - set(defaults)
        if unknown:
            raise ValueError(f"unknown handler options in model-config.yaml: {sorted(unknown)}")
        self.options = cfg
        threads = cfg["threads"]
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise ValueError(f"handler option threads must be an integer >= 0, got {threads!r}")
        if threads:
            torch.set_num_threads(threads)

        gpu_id = props.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
            # Once per worker: a pod that asked for a GPU and sees none still serves, on the CPU.
            logger.info("%s: no CUDA device visible to this worker: running on the CPU", context.model_name)
        # Reduced precision only where it pays: autocast on CUDA, full precision on CPU.
        dtype = cfg.get("cuda_dtype", "float32")
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

        model_manifest = (context.manifest or {}).get("model", {})
        # The archive's version (make archive VERSION=...), named in every answer: during a rollout
        # or a canary, a client and the tests can tell which version answered.
        self.version = str(model_manifest.get("modelVersion", ""))
        serialized = model_manifest.get("serializedFile", "checkpoint.pt")
        path = os.path.join(model_dir, serialized)
        t0 = time.perf_counter()
        ckpt = checkpoint.load(path, self.task)
        self.checkpoint_meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        self.model = checkpoint.rebuild(ckpt, self.device)
        self.model = optimize(self.model, cfg.get("optimize", "none"), self.device, model_dir)
        self.setup(ckpt)
        self.initialized = True
        logger.info(
            "%s: loaded %s on %s in %.2fs (options %s)",
            type(self).__name__,
            serialized,
            self.device,
            time.perf_counter() - t0,
            self.options,
        )

    # -- what subclasses provide ------------------------------------------------------------

    def setup(self, ckpt: dict) -> None:
        """Read labels, vocabularies and preprocessing constants from the checkpoint."""

    def parse(self, payload: Any) -> list[Any]:
        """One request's payload -> (items, whether it sent a list); raise InvalidInput."""
        raise NotImplementedError

    def preprocess(self, items: list[Any]) -> Any:
        """Parsed items of the whole batch -> model input."""
        raise NotImplementedError

    def inference(self, batch: Any, items: list[Any] | None = None) -> Any:
        raise NotImplementedError

    def postprocess(self, output: Any, items: list[Any] | None = None) -> list[Any]:
        """Model output -> one JSON-able answer per item."""
        raise NotImplementedError

    def cost(self, items: list[Any], explain: bool) -> int:
        """The work of one request's parsed items, in the units of ``budget``; raise InvalidInput
        to refuse a request that is too much work on its own."""
        return len(items)

    def budget(self) -> int | None:
        """The most work one batch may hold (None: no limit). Past it, requests are admitted
        smallest first, and the rest get BatchFull (503)."""
        return None

    # -- the batch path -----------------------------------------------------------------------

    def explain_items(self, items: list[Any]) -> list[Any]:
        """One explanation per parsed item (a request to /explanations, or with "explain": true)."""
        raise InvalidInput(f"{type(self).__name__} has no explanations", 501)

    def explanation_allowed(self) -> None:
        """Explanations need gradients or attention weights of the eager model."""
        if self.options["optimize"] != "none":
            raise InvalidInput(
                f"no explanations from the optimised variant (optimize: {self.options['optimize']})", 501
            )

    def predict_items(self, items: list[Any]) -> list[Any]:
        """preprocess -> inference -> postprocess for already-parsed items (one forward)."""
        clock = self.stages or _no_clock
        with torch.inference_mode(), self._autocast():
            with clock("preprocess"):
                batch = self.preprocess(items)
            with clock("inference"):
                output = self.inference(batch, items)
        with clock("postprocess"):
            return self.postprocess(output, items)

    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype is not None:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return torch.autocast("cpu", enabled=False)

    def handle(self, data: list[dict], context) -> list[Any]:
        if self.busy_fd is None:
            return self._handle(data, context)
        os.pwrite(self.busy_fd, b"1", 0)
        try:
            return self._handle(data, context)
        finally:
            os.pwrite(self.busy_fd, b"0", 0)

    def _handle(self, data: list[dict], context) -> list[Any]:
        self.context = context
        clock = self.stages or _no_clock
        t0 = time.perf_counter()
        results: list[Any] = [None] * len(data)
        groups: list[Parsed] = []
        items: dict[bool, list[Any]] = {False: [], True: []}  # predictions, explanations
        for i, request in enumerate(data):
            try:
                if _is_form(context, i):
                    raise InvalidInput(
                        "body was sent as an HTML form (curl -d/--data-binary without a Content-Type): "
                        "send raw bytes with Content-Type application/octet-stream, image/*, "
                        "text/plain or application/json, or use curl -T",
                        415,
                    )
                with clock("parse"):
                    payload = maybe_json(request_payload(request or {}))
                    explain = _wants_explanation(context, i, payload)
                    parsed, many = self.parse(payload)
                    cost = self.cost(parsed, explain)
            except InvalidInput as e:
                results[i] = self._fail(context, i, e)
                continue
            except Exception as e:  # a parser bug must still fail this request alone
                logger.exception("request %d: unexpected error while parsing", i)
                results[i] = self._fail(
                    context, i, InvalidInput(f"could not read the request ({type(e).__name__})", 500)
                )
                continue
            groups.append(Parsed(i, len(parsed), many, explain, parsed, cost))
        groups = self._admit(context, groups, results)
        for g in groups:
            items[g.explain].extend(g.items)
        answers = {False: self.predict_items(items[False]) if items[False] else [], True: []}
        if items[True]:
            refused: InvalidInput | None = None
            try:
                answers[True] = self.explain_items(items[True])
            except InvalidInput as e:  # explanations refused as a whole (e.g. an optimised variant)
                refused = e
            except Exception as e:  # an explainer bug fails the explanations, never the predictions
                logger.exception("explanations failed")
                refused = InvalidInput(f"could not explain ({type(e).__name__})", 500)
            if refused is not None:
                for g in groups:
                    if g.explain:
                        results[g.index] = self._fail(context, g.index, refused)
                groups = [g for g in groups if not g.explain]
        pos = {False: 0, True: 0}
        with clock("serialise"):
            for i, n, many, explain, _, _ in groups:
                out = answers[explain][pos[explain] : pos[explain] + n]
                pos[explain] += n
                results[i] = _json(out if many else out[0])
                context.set_response_content_type(i, "application/json; charset=utf-8")
        for i in range(len(data)):
            context.set_response_header(i, "X-Batch-Size", str(len(data)))
            context.set_response_header(i, "X-Model-Version", self.version)
        # Every worker stdout line is also parsed and logged by the frontend, so a clean batch is
        # logged at DEBUG; one with refused requests shows at INFO.
        failed = len(data) - len(groups)
        ms = 1000 * (time.perf_counter() - t0)
        logger.log(
            logging.INFO if failed else logging.DEBUG,
            "batch_size=%d items=%d failed=%d ms=%.1f",
            len(data),
            len(items[False]) + len(items[True]),
            failed,
            ms,
        )
        self._emit_metrics(context, ms, [context.get_response_status(i)[0] for i in range(len(data))] if failed else [])
        return results

    def _admit(self, context, groups: list[Parsed], results: list) -> list[Parsed]:
        """The parsed requests that fit in this batch's budget, in their order; those that do not
        (the largest, once the smaller ones are in) get BatchFull."""
        budget = self.budget()
        if budget is None or sum(g.cost for g in groups) <= budget:
            return groups
        admitted, used = set(), 0
        for g in sorted(groups, key=lambda g: g.cost):  # stable: equal costs keep their arrival order
            if used + g.cost <= budget:
                admitted.add(g.index)
                used += g.cost
            else:
                results[g.index] = self._fail(
                    context,
                    g.index,
                    BatchFull(
                        f"this batch is full ({used} of {budget} {self.work_unit} taken, the request needs {g.cost}): retry"
                    ),
                )
        return [g for g in groups if g.index in admitted]

    def _emit_metrics(self, context, ms: float, codes: list) -> None:
        """TorchServe's HandlerTime (BaseHandler.handle emits it; this handle replaces that one) and
        a count of refused requests by status, both on the metrics endpoint (HandlerRequestErrors
        is registered by model_metrics_auto_detect in config.properties)."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:  # in-process runs without a server
            return
        metrics.add_time("HandlerTime", round(ms, 2), None, "ms")
        for code, n in collections.Counter(c for c in codes if c and c >= 400).items():
            dims = [
                Dimension("ModelName", context.model_name),
                Dimension("Level", "Model"),
                Dimension("Status", str(code)),
            ]
            metrics.add_counter("HandlerRequestErrors", n, None, dims)

    @staticmethod
    def _fail(context, idx: int, exc: InvalidInput) -> bytes:
        context.set_response_status(exc.code, str(exc), idx=idx)
        context.set_response_content_type(idx, "application/json; charset=utf-8")
        return _json(error_body(exc))


def optimize(model: torch.nn.Module, how: str, device: torch.device, model_dir: str | None = None) -> torch.nn.Module:
    """The archive's optimisation variant (model-config.yaml `handler.optimize`).

    int8: dynamic int8 quantisation of Linear and LSTM weights (activations quantised on the fly),
    CPU only. aoti: the forward compiled ahead of time by AOTInductor into the archive's
    model.pt2 (make archive VARIANT=aoti), for the CPU it was built on. scripts/variants.py
    measures each one's accuracy/BLEU delta and speed ratio against eager.
    """
    if how == "none":
        return model
    if how == "int8":
        if device.type != "cpu":
            raise ValueError("optimize: int8 is a CPU variant; on CUDA use cuda_dtype: bfloat16 or float16")
        # Not inside TransformerEncoderLayers: their fast-path check reads linear weights as
        # tensors, which quantised Linears no longer have. The decoder and the vocabulary
        # projection, the translator's largest layers, are still quantised.
        encoders = [n for n, m in model.named_modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
        spec = {
            n: torch.ao.quantization.default_dynamic_qconfig
            for n, m in model.named_modules()
            # exact types: attention's out_proj is a Linear subclass attention reads directly
            if type(m) in (torch.nn.Linear, torch.nn.LSTM) and not any(n.startswith(e + ".") for e in encoders)
        }
        with warnings.catch_warnings():  # torch marks its quantised tensor constructors deprecated
            warnings.simplefilter("ignore", UserWarning)
            return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    if how == "aoti":
        if device.type != "cpu":
            raise ValueError(
                "optimize: aoti archives hold code compiled for a CPU; on CUDA use cuda_dtype: bfloat16 or float16"
            )
        path = os.path.join(model_dir or ".", AOTI_PACKAGE)
        if not os.path.isfile(path):
            raise ValueError(
                f"optimize: aoti needs {AOTI_PACKAGE} in the archive; build it with make archive VARIANT=aoti"
            )
        return CompiledForward(torch._inductor.aoti_load_package(path))
    raise ValueError(f"optimize must be none, int8 or aoti, got {how!r}")


class CompiledForward(torch.nn.Module):
    """An AOTInductor-compiled forward in the place of the eager model (forward only)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)


class StageClock:
    """CPU and wall seconds spent in each stage of the batch path: parse (body -> items, image
    decoding included), preprocess (tensor assembly and the copy to the device), inference,
    postprocess (model output -> answers) and serialise (answers -> JSON bytes).

    CPU time is the whole process's (torch's intra-op threads included). On CUDA each stage waits
    for the GPU before its wall clock stops, so work is charged to the stage that queued it.
    """

    def __init__(self, device: torch.device | None = None):
        self.cpu: collections.Counter = collections.Counter()
        self.wall: collections.Counter = collections.Counter()
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None

    @contextlib.contextmanager
    def __call__(self, stage: str):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.cpu[stage] += time.process_time() - cpu
            self.wall[stage] += time.perf_counter() - wall


@contextlib.contextmanager
def _no_clock(stage: str):
    yield


def _json(answer: Any) -> bytes:
    """UTF-8 JSON (Spanish stays readable; TorchServe's own encoding escapes it to ASCII)."""
    return json.dumps(answer, ensure_ascii=False).encode("utf-8")


def _wants_explanation(context, idx: int, payload: Any) -> bool:
    """A request to /explanations/<model> (TorchServe sets the request header explain=True), or a
    JSON body with "explain": true, which also works over gRPC: TorchServe 0.12's gRPC API has no
    explanations call. The key is removed before the handler parses the body."""
    asked = False
    if isinstance(payload, dict) and "explain" in payload:
        asked = payload.pop("explain")
        if not isinstance(asked, bool):
            raise InvalidInput(f"'explain' must be true or false, got {safe_message(repr(asked), 40)}")
    return asked or str(context.get_request_header(idx, "explain")) == "True"


def _is_form(context, idx: int) -> bool:
    """curl -d and --data-binary default to a form; TorchServe then mangles binary bodies."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    ctype = next((str(v) for k, v in headers.items() if str(k).lower() == "content-type"), "")
    return ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
