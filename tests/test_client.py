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


def test_authority_is_sent_as_the_host_a_serverless_revision_is_routed_on():
    """Knative's activator finds a revision from the Host (<revision>.<ns>.svc.cluster.local): a
    client calling the revision's Service by its address must send that name, and only to inference."""
    import http.server

    hosts: list[str] = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            hosts.append(self.headers["Host"])
            body = b'{"label": 7}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ports = {**PORTS, "inference": httpd.server_address[1]}
        name = "tssl-cnn-00001.e2e.svc.cluster.local"
        for authority in (None, name):
            s = Settings(host="127.0.0.1", ports=ports, timeout=10, inference_token="", authority=authority)
            with Client("rest", s) as client:
                assert client.predict("cnn", b"x") == {"label": 7}
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert hosts == [f"127.0.0.1:{ports['inference']}", name]
