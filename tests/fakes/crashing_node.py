"""A stand-in for a managed llama.cpp server, for the crash path: it starts and answers
``GET /v1/models`` like a healthy server, then dies on a chat request the way a build for
another CPU does, by SIGILL. Fault injection only.

    python crashing_node.py --port N [--heal-file PATH] [--mode sigill|error]

``--mode error`` answers every chat request 500 instead (a server that never generates);
``--mode hang`` never answers one.
While ``--heal-file`` exists it serves instead: an OpenAI ``chat.completion`` with usage.
Standard library only, so it starts fast and needs nothing installed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def completion(model: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def handler(mode: str, heal_file: Path | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if heal_file is not None and heal_file.exists():
                self._json(200, completion(str(body.get("model", "m"))))
            elif mode == "error":
                self._json(500, {"error": {"message": "no generation", "type": "server_error"}})
            elif mode == "hang":
                time.sleep(3600)  # a generation that never comes
            else:
                os.kill(os.getpid(), signal.SIGILL)

        def _json(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heal-file", type=Path)
    parser.add_argument("--mode", choices=("sigill", "error", "hang"), default="sigill")
    options = parser.parse_args()
    # SIGILL must kill: undo any handler an interpreter option may have installed.
    signal.signal(signal.SIGILL, signal.SIG_DFL)
    server = ThreadingHTTPServer(
        ("127.0.0.1", options.port), handler(options.mode, options.heal_file)
    )
    print(f"stand-in node listening on {options.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
