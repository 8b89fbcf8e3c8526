"""A local stand-in for the providers' HTTP APIs, on 127.0.0.1: the real
SDKs (their ``base_url`` pointed here) get recorded bodies from
tests/data/capture (taken from /work/shared/peer-responses: real responses
and stream transcripts). Never a provider."""
import itertools
import json
import pathlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DATA = pathlib.Path(__file__).resolve().parent / "data" / "capture"

# (what the path ends with, streamed) -> the recorded body.
BODIES = {
    ("chat/completions", False): "chat_cache_read.json",
    ("chat/completions", True): "chat_stream.sse",
    ("responses", False): "resp_cached.json",
    ("responses", True): "resp_web_search_stream.sse",
    ("messages", False): "ant_cache_read.json",
    ("messages", True): "hc_anthropic_stream_1h.sse",
    (":generateContent", False): "gem_thinking.json",
    (":streamGenerateContent", True): "gem_stream_thinking.sse",
}
AZURE_CHAT = "azure_chat.json"

# Each body's response id: served with a number appended, a new one for every
# response, as a provider's ids are (psai records a response id once).
RESPONSE_IDS = {
    "ant_cache_read.json": "msg_01UUPT9QdZnZSRzcQJkjG25U",
    "azure_chat.json": "chatcmpl-BAeyRj7gU6aCNSSAskAFbupBWYMIT",
    "chat_cache_read.json": "chatcmpl-E1mBQt42vYTsKNd5wnyJlT0db7v9S",
    "chat_stream.sse": "chatcmpl-Dx0XpqH8w09uBXwq1zFGYdETjtnEl",
    "gem_stream_thinking.sse": "hVP6afiZEuitz7IPypuAsQY",
    "gem_thinking.json": "ON4gaYT4Gc20qtsP2bSiiQ0",
    "hc_anthropic_stream_1h.sse": "msg_018nzQcNteHNGhuEAzJDzUMd",
    "resp_cached.json": "resp_67e53e7416808191a407bcab0af8377b03c28585ba97a132",
    "resp_web_search_stream.sse": "resp_00a60507bf41223d0068c9d2fbf93481a0ba2a7796ae2cab4c",
}


def body_text(name):
    return (DATA / name).read_text()


def sse_without_usage(text):
    """An OpenAI chat stream as the API sends it when usage was not asked
    for: no usage-only chunk, no usage key on the others."""
    kept = []
    for block in text.split("\n\n"):
        if block.startswith("data: {"):
            chunk = json.loads(block[len("data: "):])
            if chunk.get("usage") is not None and not chunk.get("choices"):
                continue
            chunk.pop("usage", None)
            block = "data: " + json.dumps(chunk)
        kept.append(block)
    return "\n\n".join(kept)


class ProviderServer:
    """``url``; ``requests``: (path, JSON body) of every request served;
    ``response_ids``: the response id each one was served with.
    ``failing``: an HTTP status every request is answered with (an API
    error), None to serve the bodies; ``gate``: a threading.Event each
    request waits for before it is answered (a call held in flight), None
    to answer at once."""

    def __init__(self):
        self.requests = []
        self.response_ids = []
        self.failing = None
        self.gate = None
        served = itertools.count(1)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out as two writes: without this, Nagle's algorithm holds the body
                # for the client's delayed ACK (40 ms a call).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                server.requests.append((self.path, body))
                if server.gate is not None:
                    server.gate.wait(60)
                if server.failing is not None:
                    payload = json.dumps({"error": {"message": "a failure", "type": "server_error"}}).encode()
                    self.send_response(server.failing)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                path = self.path.split("?")[0]
                streamed = bool(body.get("stream")) or path.endswith(":streamGenerateContent")
                name = next((file for (end, stream), file in BODIES.items()
                             if path.endswith(end) and stream == streamed), None)
                if name is None:
                    self.send_error(404)
                    return
                if "/openai/deployments/" in path and not streamed:
                    name = AZURE_CHAT
                text = body_text(name)
                response_id = "%s-%d" % (RESPONSE_IDS[name], next(served))
                server.response_ids.append(response_id)
                text = text.replace(RESPONSE_IDS[name], response_id)
                if path.endswith("chat/completions") and streamed \
                        and not (body.get("stream_options") or {}).get("include_usage"):
                    text = sse_without_usage(text)
                payload = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream" if streamed else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
