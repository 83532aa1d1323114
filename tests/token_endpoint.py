"""A loopback OAuth2 token endpoint (RFC 6749 section 5 answers) that tests script: each
request is recorded and answered by the next scripted reply (the last one repeats)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] | bytes = field(
        default_factory=lambda: {"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600}
    )


@dataclass
class TokenEndpoint:
    url: str
    replies: list[Reply]
    requests: list[dict[str, str]] = field(default_factory=list)

    def token(self, access: str, expires_in: int = 3600, **extra: Any) -> Reply:
        return Reply(
            200, {"access_token": access, "token_type": "Bearer", "expires_in": expires_in, **extra}
        )


@contextmanager
def token_endpoint(*replies: Reply) -> Iterator[TokenEndpoint]:
    state = TokenEndpoint("", list(replies) or [Reply()])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            state.requests.append({k: v[0] for k, v in form.items()})
            reply = state.replies.pop(0) if len(state.replies) > 1 else state.replies[0]
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/token"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
