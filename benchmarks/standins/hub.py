"""A stand-in ModelScope hub on 127.0.0.1 that speaks what ModelScope's own client (modelscope-hub) asks:

    GET /api/v1/models/{owner}/{name}/repo/files?Revision=master&Recursive=True
        -> {"Code": 200, "Data": {"Files": [{"Path", "Name", "Size", "Sha256", "Type": "blob"}, ...]}, "Success": true}
    GET /api/v1/models/{owner}/{name}/repo?Revision=master&FilePath=PATH   (HTTP Range honoured: 206)
    GET /api/v1/repos/internalAccelerationInfo                              (the client's region probe: 404 here)

It serves a folder's files under a repo id, and misbehaves on request (the `faults` attributes) so that tests
can cut connections, lie about a checksum, answer HTML, 500s or JSON of another shape, list hostile paths, or
stream slowly. Every request is recorded (`requests`)."""

import hashlib
import http.server
import json
import os
import threading
import time
import urllib.parse


def folder_files(folder):
    """{path with '/' separators: file on disk} of every file under folder."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = path
    return files


def folder_listing(folder):
    """{path: bytes} of every file under folder, with '/' separators."""
    out = {}
    for rel, path in folder_files(folder).items():
        with open(path, "rb") as f:
            out[rel] = f.read()
    return out


class Blob:
    """A served file: bytes, or a file on disk read when asked (full-size models do not fit in memory twice)."""

    def __init__(self, source):
        self.source = source
        self.size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        self._sha = None

    def read(self, start, end):
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def sha256(self):
        if self._sha is None:
            digest = hashlib.sha256()
            for at in range(0, self.size, 1 << 24):
                digest.update(self.read(at, min(self.size, at + (1 << 24))))
            self._sha = digest.hexdigest()
        return self._sha


class StandInHub:
    """hub = StandInHub({"iic/model": folder}); hub.start(); ... hub.url ...; hub.stop()."""

    def __init__(self, repos):
        self.repos = {repo: {p: Blob(v) for p, v in (folder_files(folder) if isinstance(folder, (str, os.PathLike))
                                                      else folder).items()}
                      for repo, folder in repos.items()}
        self.requests = []  # (path, query dict, Range header or None)
        self.lock = threading.Lock()
        self.reset_faults()
        self._server = None

    def reset_faults(self):
        self.listing_override = {}  # repo -> list of entries served instead of the real listing
        self.listing_answer = None  # (status, content type, body bytes) for every listing request
        self.wrong_sha = set()  # paths listed with a checksum their bytes do not have
        self.cut_after = {}  # path -> bytes sent before the connection is dropped (once per entry)
        self.rate = None  # bytes per second for file bodies (None: as fast as possible)
        self.down = False  # every request: the connection is closed without an answer

    # ------------------------------------------------------------------------------------------

    def entries(self, repo):
        if repo in self.listing_override:
            return self.listing_override[repo]
        out = []
        for path, blob in sorted(self.repos[repo].items()):
            sha = blob.sha256()
            if path in self.wrong_sha:
                sha = hashlib.sha256(sha.encode()).hexdigest()
            out.append({"Path": path, "Name": path.rsplit("/", 1)[-1], "Size": blob.size, "Sha256": sha,
                        "Type": "blob"})
        return out

    def file_requests(self):
        """(file path, Range header) of every file download request so far."""
        with self.lock:
            return [(q.get("FilePath"), rng) for p, q, rng in self.requests if p.endswith("/repo")]

    def start(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                with hub.lock:
                    hub.requests.append((url.path, query, self.headers.get("Range")))
                if hub.down:
                    self.close_connection = True
                    return
                parts = url.path.strip("/").split("/")
                # api/v1/models/OWNER/NAME/repo[/files]
                if len(parts) >= 6 and parts[:3] == ["api", "v1", "models"] and parts[5] == "repo":
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self.json(404, {"Code": 10010205001, "Message": f"model {repo} not found",
                                               "Success": False})
                    if parts[6:] == ["files"]:
                        return self.listing(repo)
                    if len(parts) == 6:
                        return self.file(repo, query.get("FilePath", ""))
                self.json(404, {"Code": 404, "Message": "not found", "Success": False})

            def json(self, status, body):
                self.send(status, "application/json", json.dumps(body).encode())

            def send(self, status, ctype, data, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def listing(self, repo):
                if hub.listing_answer is not None:
                    status, ctype, body = hub.listing_answer
                    return self.send(status, ctype, body)
                self.json(200, {"Code": 200, "Data": {"Files": hub.entries(repo)}, "Success": True})

            def file(self, repo, path):
                blob = hub.repos[repo].get(path)
                if blob is None:
                    return self.json(404, {"Code": 404, "Message": f"file {path} not found", "Success": False})
                start, end, status, headers = 0, blob.size, 200, []
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    first, _, last = rng[len("bytes="):].partition("-")
                    start = int(first)
                    end = min(blob.size, int(last) + 1) if last else blob.size
                    if start >= blob.size:
                        return self.send(416, "text/plain", b"", [("Content-Range", f"bytes */{blob.size}")])
                    status = 206
                    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{blob.size}"))
                length = end - start
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                with hub.lock:
                    cut = hub.cut_after.pop(path, None)
                limit = length if cut is None else max(0, min(length, cut - start))
                sent, chunk = 0, 1024 * 1024
                try:
                    while sent < limit:
                        piece = blob.read(start + sent, start + min(limit, sent + chunk))
                        self.wfile.write(piece)
                        sent += len(piece)
                        if hub.rate:
                            time.sleep(len(piece) / hub.rate)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if cut is not None:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # a short poll: stop() waits for the serving loop's next look (half a second by default, for every hub a
        # generated test starts)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
