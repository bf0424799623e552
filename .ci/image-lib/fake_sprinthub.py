#!/usr/bin/env python3
"""A SprintHub stand-in for the image checks, run on the host.

    python3 .ci/image-lib/fake_sprinthub.py --port-file PORTFILE --calls CALLS.jsonl

Listens on 0.0.0.0 (containers reach it through the host's address) on a free
port, which it writes to PORTFILE once it listens. `POST /customobjects/link`
answers 200 with a relationship object, as SprintHub does (SPEC section 2);
every other request answers 404. Each request is appended to CALLS.jsonl as one
JSON object: method, path, instance (`i`), whether `apitoken` was present and
matched the one in --token-file, and the JSON body. The token itself is not written.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--calls", required=True)
    ap.add_argument("--token-file", help="the token expected in `apitoken`, read per request")
    ap.add_argument("--bind", default="0.0.0.0")
    args = ap.parse_args()
    lock = threading.Lock()
    counter = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *a: object) -> None:  # quiet
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            length = min(int(self.headers.get("content-length") or 0), MAX_BODY)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            token = (query.get("apitoken") or [""])[0]
            try:
                expected = open(args.token_file, encoding="utf-8").read() if args.token_file else ""
            except OSError:
                expected = ""
            record = {
                "method": self.command,
                "path": url.path,
                "instance": (query.get("i") or [None])[0],
                "token_ok": bool(expected) and hmac.compare_digest(token, expected),
                "body": body,
            }
            with lock:
                counter[0] += 1
                n = counter[0]
                with open(args.calls, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if self.command == "POST" and url.path == "/customobjects/link":
                obj = body if isinstance(body, dict) else {}
                self._answer(200, {
                    "id": n,
                    "objectId": obj.get("objectId"),
                    "linkType": obj.get("linkType"),
                    "targetId": obj.get("targetId"),
                    "amount": obj.get("amount"),
                })
            else:
                self._answer(404, {"msg": "not found"})

        do_GET = _handle
        do_POST = _handle
        do_PUT = _handle

    server = ThreadingHTTPServer((args.bind, 0), Handler)
    server.daemon_threads = True
    with open(args.port_file, "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
