"""A real chat-completions HTTP server on 127.0.0.1 for tests and benchmarks, with scripted misbehaviour.

It answers POST /v1/chat/completions. The reply is built from the prompt: the passage between
<passage> tags becomes a query, a title or a sentence pair (whichever JSON the prompt asks for), plus a
short tag derived from the template text, so that different templates give different replies and the
same passage with the same template gives the same one.

A script maps a marker (any substring of the passage) to the behaviour of successive attempts of one
request (same messages and seed): {"doc-429": ["429", "ok"]} answers the first attempt with 429 and
the second normally; the last entry repeats. Behaviours: ok, 429 (with Retry-After), 500, slow (sleeps
past the client's timeout, then answers), malformed (a truncated JSON body), nonjson (content that is
not JSON), badschema (JSON without the asked-for field), offtopic (a query unrelated to the passage),
401, 401echo (a careless server: the body quotes the Authorization header it refused, decoded too for
basic auth, with the header across the 300th character, where a client cutting before it scrubs
secrets would leave part of one).

    with LLMServer(script={...}, latency=0.2) as server:
        server.url          # http://127.0.0.1:PORT/v1
        server.requests     # one dict per request: marker, behaviour, authorization, body

Run standalone for manual checks: python tests/llm_server.py --latency 0.2 --lifetime 600
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PASSAGE = re.compile(r"<passage>\s*(.*?)\s*</passage>", re.DOTALL)


def _cut(text: str, limit: int) -> str:
    """The start of `text`, at most `limit` characters, ending at a word boundary where there is one."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def reply_content(user_message: str) -> str:
    """The JSON a well-behaved model would answer to one of data_gen's templates."""
    match = _PASSAGE.search(user_message)
    passage = " ".join((match.group(1) if match else user_message).split())
    template_text = _PASSAGE.sub("", user_message)
    tag = "v" + hashlib.sha256(template_text.encode("utf-8")).hexdigest()[:4]
    if '"sentence1"' in user_message:
        sentence = _cut(passage.split(". ")[0], 150)
        return json.dumps({"sentence1": sentence, "sentence2": f"{tag}: {sentence}", "score": 4.0})
    if '"title"' in user_message:
        return json.dumps({"title": f"{_cut(passage, 50)} {tag}"}, ensure_ascii=False)
    return json.dumps({"query": f"{_cut(passage, 55)} {tag}"}, ensure_ascii=False)


class LLMServer:
    def __init__(self, script: dict[str, list[str]] | None = None, latency: float = 0.0,
                 slow_seconds: float = 3.0, retry_after: str = "1", lifetime: float = 600.0, port: int = 0):
        self.script = script or {}
        self.port = port
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.lifetime = lifetime  # a safety net: the server shuts itself down after this many seconds
        self.requests: list[dict] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> LLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers and clients use
            disable_nagle_algorithm = True  # headers and body otherwise wait ~40 ms on a delayed ACK

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    server._answer(self, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        ThreadingHTTPServer.request_queue_size = 256  # many clients connect at once
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._timer.cancel()
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _behaviour(self, body: dict, user: str) -> tuple[str, str]:
        match = _PASSAGE.search(user)
        passage = match.group(1) if match else user
        marker = next((m for m in self.script if m in passage), None)
        if marker is None:
            return "", "ok"
        request_id = hashlib.sha256(json.dumps([body.get("messages"), body.get("seed")]).encode()).hexdigest()
        with self._lock:
            attempt = self._attempts.get(request_id, 0)
            self._attempts[request_id] = attempt + 1
        plan = self.script[marker]
        return marker, plan[min(attempt, len(plan) - 1)]

    def _answer(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        body = json.loads(raw)
        user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        marker, behaviour = self._behaviour(body, user)
        with self._lock:
            self.requests.append({"marker": marker, "behaviour": behaviour, "body": body, "time": time.monotonic(),
                                  "authorization": handler.headers.get("Authorization")})
        if self.latency:
            time.sleep(self.latency)
        if behaviour == "slow":
            time.sleep(self.slow_seconds)
        if behaviour in ("ok", "slow"):
            content = reply_content(user)
        elif behaviour == "nonjson":
            content = "Sure! A good query for this passage would be about its main finding."
        elif behaviour == "offtopic":  # well-formed, but about something else than the passage
            content = json.dumps({"query": "best chocolate cake recipe with fresh strawberries",
                                  "title": "A chocolate cake recipe with fresh strawberries"})
        elif behaviour == "badschema":
            content = json.dumps({"answer": "a reply without the asked-for field"})
        elif behaviour == "malformed":
            self._send(handler, 200, b'{"id": "cmpl-1", "choices": [{"message": {"content": "', "application/json")
            return
        elif behaviour == "429":
            self._send(handler, 429, b'{"error": "rate limited"}', "application/json",
                       {"Retry-After": self.retry_after})
            return
        elif behaviour in ("500", "401"):
            self._send(handler, int(behaviour), b'{"error": "scripted failure"}', "application/json")
            return
        elif behaviour == "401echo":
            authorization = handler.headers.get("Authorization") or ""
            decoded = ""
            if authorization.startswith("Basic "):
                decoded = f" ({base64.b64decode(authorization[6:]).decode('utf-8')})"
            message = f"invalid credentials{decoded}: ".ljust(270, ".") + authorization
            self._send(handler, 401, json.dumps({"error": message}).encode("utf-8"), "application/json")
            return
        else:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        reply = {
            "id": "cmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(content.split()),
                      "total_tokens": len(user.split()) + len(content.split())},
        }
        self._send(handler, 200, json.dumps(reply).encode("utf-8"), "application/json")

    @staticmethod
    def _send(handler, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)
        handler.wfile.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--lifetime", type=float, default=600.0)
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed on start)")
    args = p.parse_args()
    server = LLMServer(latency=args.latency, lifetime=args.lifetime, port=args.port).start()
    print(server.url, flush=True)
    deadline = time.monotonic() + args.lifetime
    while server._httpd is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    server.stop()


if __name__ == "__main__":
    main()
