"""The project's client over gRPC, against a gRPC server in this process (the generated servicer)."""

from __future__ import annotations

import socket
import sys
import threading
from concurrent import futures

import grpc
import pytest

from scripts.client import GEN_DIR, Client, ServerError, Settings
from scripts.serve import PORTS


def test_each_grpc_client_opens_its_own_connection():
    """A new client, as a caller makes after a failure, must not be handed the connection of an older
    one: gRPC shares connections between channels of one target unless told not to, and a shared
    connection to a pod on a lost node gives every new client the same timeouts."""
    sys.path.insert(0, str(GEN_DIR))  # the generated modules import each other top-level (`make protos`)
    import inference_pb2
    import inference_pb2_grpc

    peers: set[str] = set()
    lock = threading.Lock()

    class Inference(inference_pb2_grpc.InferenceAPIsServiceServicer):
        def Predictions(self, request, context):  # noqa: N802 - the generated servicer's name
            with lock:
                peers.add(context.peer())
            return inference_pb2.PredictionResponse(prediction=b"7")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Inference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ports = {**PORTS, "grpc_inference": port, "grpc_management": port}
        s = Settings(host="127.0.0.1", ports=ports, timeout=10, inference_token="", management_token="")
        first, second = Client("grpc", s), Client("grpc", s)
        try:
            assert first.predict("cnn", b"x") == 7
            assert second.predict("cnn", b"x") == 7  # while the first's connection is open
        finally:
            first.close()
            second.close()
    finally:
        server.stop(None)
    assert len(peers) == 2, peers


def test_a_refused_connection_is_named_with_the_socket_s_reason():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(host="127.0.0.1", ports={**PORTS, "inference": port}, timeout=5, inference_token="")
    with pytest.raises(ServerError, match=r"cannot connect \(ConnectionError: \[Errno 111\] Connection refused\)"):
        Client("rest", settings).predict("cnn", b"x")
