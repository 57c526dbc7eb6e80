"""A real HTTP server with Range requests for the remote-dataset tests (run as a subprocess
so a test can kill it). Serves a folder read-only; every GET is appended to a log file
(one line: the path and the range) so tests count downloads on the server side.

    python _range_http_server.py ROOT PORT LOGFILE [--status CODE]
"""
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
STATUS = int(sys.argv[sys.argv.index("--status") + 1]) if "--status" in sys.argv else 0
DELAY = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0  # s per full GET
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _file(self):
        rel = self.path.split("?", 1)[0].lstrip("/")
        p = os.path.realpath(os.path.join(ROOT, rel))
        if not p.startswith(os.path.realpath(ROOT) + os.sep) or not os.path.isfile(p):
            return None
        return p

    def _fail(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body):
        if STATUS:
            return self._fail(STATUS)
        p = self._file()
        if p is None:
            return self._fail(404)
        size = os.path.getsize(p)
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        m = re.match(r"bytes=(\d*)-(\d*)$", rng or "")
        if m:
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            end = min(end, size - 1)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
        if body:
            with _lock, open(LOG, "a") as f:
                f.write(f"{self.command} {self.path} {rng or 'full'}\n")
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT")
        self.send_header("ETag", f'"{size}"')
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            if DELAY and not m:
                import time

                time.sleep(DELAY)
            with open(p, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left:
                    b = f.read(min(left, 1 << 16))
                    if not b:
                        break
                    self.wfile.write(b)
                    left -= len(b)


ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print("ready", flush=True)
srv.serve_forever()
