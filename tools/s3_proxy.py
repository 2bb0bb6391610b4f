#!/usr/bin/env python3
"""An S3 endpoint that behaves like S3 over a network: a proxy in front of a local S3 server (moto).

    python tools/s3_proxy.py UPSTREAM_URL [--port N] [--delay-ms 20] [--reset-every 25] [--slowdown-every 50]
                             [--ignore-conditions]

- Every request waits --delay-ms before it is forwarded: the round trip of a real network.
- Faults: every Nth new S3 connection is reset before its first request reaches the server
  (--reset-every; connections to the control endpoint below are neither reset nor counted), every Nth
  request is answered `503 SlowDown` without reaching it (--slowdown-every);
  `POST /__proxy__/die` makes the endpoint disappear: open connections are reset, new ones refused.
- A kill at a request (tools/soak_s3.py): `freeze_at_write(n)` holds the n-th request from then on that
  changes the bucket (PUT, COPY, DELETE, a multipart step, ...) and every request after it, none reaching
  the server: the bucket is left as the client's process would leave it, killed as it sent that request.
  `frozen` is set when it happens; `thaw()` resets the held connections and serves again.
- --ignore-conditions strips If-None-Match and If-Match from every request: an endpoint that ignores
  conditional writes (older MinIO, some gateways), on which a compare-and-swap always succeeds.
- It counts requests by S3 operation (LIST, GET, HEAD, PUT, COPY, MPU_INIT, MPU_PART, MPU_COMPLETE,
  DELETE, BULK_DELETE, ...), in all and per bucket: `GET /__proxy__/counts`, `POST /__proxy__/reset`
  (zeroes the counts); with --journal, `GET /__proxy__/journal` gives each request's time and key too
  (a DeleteObjects: its first key).
  Only requests that reach the server are counted; faults are counted apart.

Prints `listening on http://127.0.0.1:PORT` once it accepts connections. Standard library only.
Only loopback: it binds 127.0.0.1 and forwards to the upstream given.
"""
import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, urlsplit

CONTROL = "/__proxy__/"
HEADER_END = b"\r\n\r\n"
CONDITIONS = ("if-none-match", "if-match")
READ_CHUNK = 65536
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message></Error>')
LISTEN_BACKLOG = 512
UPSTREAM_TIMEOUT_S = 120
# The operations that change a bucket: a kill between two of them leaves it as a kill at any read between.
WRITES = frozenset({"PUT", "COPY", "POST", "MPU_INIT", "MPU_PART", "MPU_COMPLETE", "MPU_ABORT", "DELETE",
                    "BULK_DELETE"})


def operation(method, target, headers):
    """The S3 operation a request is, from its verb, query and headers."""
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    path_parts = [p for p in url.path.split("/") if p]
    on_bucket = len(path_parts) <= 1  # path-style: /bucket or /bucket/key
    if method == "GET":
        if "uploads" in query:
            return "LIST_MPU"
        return "LIST" if on_bucket else "GET"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "COPY"
        if "partNumber" in query:
            return "MPU_PART"
        return "PUT"
    if method == "POST":
        if "uploads" in query:
            return "MPU_INIT"
        if "uploadId" in query:
            return "MPU_COMPLETE"
        if "delete" in query:
            return "BULK_DELETE"
        return "POST"
    if method == "DELETE":
        return "MPU_ABORT" if "uploadId" in query else "DELETE"
    return method


def request_key(target, name, body):
    """The key a request is about (path-style: /bucket/key), or a DeleteObjects' first key; "" for none."""
    if name == "BULK_DELETE":
        start = body.find(b"<Key>")
        return body[start + 5:body.find(b"</Key>", start)].decode("utf-8", "replace") if start >= 0 else ""
    from urllib.parse import unquote

    return unquote(urlsplit(target).path.split("/", 2)[2]) if urlsplit(target).path.count("/") >= 2 else ""


def control_command(target):
    """The command of a call to the proxy's own endpoint (counts, journal, reset, die), or None for an S3
    request."""
    path = urlsplit(target).path
    return path[len(CONTROL):] if path.startswith(CONTROL) else None


def request_line(head):
    """(method, target) of a request's head."""
    method, target, _ = head.decode("latin-1").split("\r\n", 1)[0].split(" ", 2)
    return method, target


def read_message(sock, buffer):
    """One HTTP/1.1 message (head, body) off sock; buffer holds bytes already read. Returns (head, body, rest)."""
    while HEADER_END not in buffer:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            return None, None, b""
        buffer += chunk
    head, _, buffer = buffer.partition(HEADER_END)
    headers = parse_headers(head)
    if headers.get("expect", "").lower() == "100-continue" and not buffer:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the AWS SDK waits for it before a PUT's body
    if "content-length" in headers:
        length = int(headers["content-length"])
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        return head, *read_chunked(sock, buffer)
    else:
        length = 0
    while len(buffer) < length:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            break
        buffer += chunk
    return head, buffer[:length], buffer[length:]


def read_chunked(sock, buffer):
    """A chunked body, returned whole and re-framed by the caller with its length."""
    def more():
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            raise OSError("connection closed inside a chunked body")
        return chunk

    body = b""
    while True:
        while b"\r\n" not in buffer:
            buffer += more()
        size_line, _, buffer = buffer.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buffer) < size + 2:
            buffer += more()
        body, buffer = body + buffer[:size], buffer[size + 2:]
        if size == 0:
            return body, buffer


def parse_headers(head):
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


def reframe(head, body, drop=()):
    """The same message with a Content-Length, no chunking, no Connection header of its own, and none of the
    headers named in drop."""
    lines = head.decode("latin-1").split("\r\n")
    kept = [line for line in lines[1:] if line.split(":", 1)[0].strip().lower()
            not in ("content-length", "transfer-encoding", "connection", "keep-alive", "expect", *drop)]
    return "\r\n".join([lines[0], *kept, f"Content-Length: {len(body)}"]).encode("latin-1")


def reset(sock):
    """Closes with an RST, as a broken network path does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class Proxy:
    def __init__(self, upstream, port=0, delay_ms=0.0, reset_every=0, slowdown_every=0, journal=False,
                 ignore_conditions=False):
        url = urlsplit(upstream)
        self.upstream = (url.hostname, url.port or 80)
        self.delay_s = delay_ms / 1000
        self.reset_every, self.slowdown_every = reset_every, slowdown_every
        self.dropped = CONDITIONS if ignore_conditions else ()
        self.counts = Counter()
        self.by_bucket = {}  # bucket -> Counter: input and output buckets apart
        self.journal = [] if journal else None  # (time, operation, bucket, key) of every request, when asked for
        self.faults = Counter()
        self._lock = threading.Lock()
        self._connections = 0
        self._requests = 0
        self._open = set()
        self.dead = False
        self._freeze_at, self._writes = 0, 0
        self.held_request = ""  # the freeze's write, "<operation> <key>"
        self.frozen, self._thawed = threading.Event(), threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(LISTEN_BACKLOG)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def serve_forever(self):
        while not self.dead:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def die(self):
        """The endpoint is gone: nothing listens, and every open connection is reset."""
        self.dead = True
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                reset(sock)

    def freeze_at_write(self, n):
        """Hold the n-th write request from now, and every request after it (see the module's doc)."""
        with self._lock:
            self._freeze_at, self._writes = n, 0
            self.frozen.clear()
            self._thawed.clear()

    def thaw(self):
        """The held requests' connections reset (their client is gone), and requests served again."""
        with self._lock:
            self._freeze_at = 0
            self.frozen.clear()
            self._thawed.set()

    def _held(self, name, key):
        """Whether this request is held: the freeze's write, or any request once it has come."""
        with self._lock:
            if self._freeze_at and not self.frozen.is_set() and name in WRITES:
                self._writes += 1
                if self._writes == self._freeze_at:
                    self.held_request = f"{name} {key}"
                    self.frozen.set()
            return self.frozen.is_set()

    def _doomed(self, head):
        """Whether a new connection, given its first request, is one to reset: every Nth S3 connection.
        A test's own calls to the control endpoint are neither reset nor counted, whatever the job has
        opened before them."""
        if control_command(request_line(head)[1]) is not None:
            return False
        with self._lock:
            self._connections += 1
            return bool(self.reset_every) and self._connections % self.reset_every == 0

    def _serve(self, client):
        buffer = b""
        first = True
        try:
            while not self.dead:
                head, body, buffer = read_message(client, buffer)
                if head is None:
                    break
                if first and self._doomed(head):
                    with self._lock:
                        self.faults["reset"] += 1
                    reset(client)
                    return
                first = False
                response = self._answer(head, body)
                if response is None or self.dead:
                    reset(client)
                    return
                client.sendall(response)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(client)
            try:
                client.close()
            except OSError:
                pass

    def _answer(self, head, body):
        method, target = request_line(head)
        command = control_command(target)
        if command is not None:
            return self._control(method, command)
        with self._lock:
            self._requests += 1
            slow = self.slowdown_every and self._requests % self.slowdown_every == 0
        time.sleep(self.delay_s)
        if slow:
            with self._lock:
                self.faults["503"] += 1
            return (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(SLOWDOWN_BODY) + SLOWDOWN_BODY)
        name = operation(method, target, parse_headers(head))
        if self._held(name, request_key(target, name, body)):
            self._thawed.wait()
            return None  # never forwarded: the connection is reset
        bucket = (urlsplit(target).path.split("/") + [""])[1]
        with self._lock:
            self.counts[name] += 1
            self.by_bucket.setdefault(bucket, Counter())[name] += 1
            if self.journal is not None:
                self.journal.append((time.time(), name, bucket, request_key(target, name, body)))
        return self._forward(head, body, method)

    def _forward(self, head, body, method):
        """The request to the server on a fresh connection (moto closes each after one answer)."""
        if self.dead:
            return None
        with socket.create_connection(self.upstream, timeout=UPSTREAM_TIMEOUT_S) as upstream:
            upstream.sendall(reframe(head, body, self.dropped) + HEADER_END + body)
            answer = b""
            while True:
                chunk = upstream.recv(READ_CHUNK)
                if not chunk:
                    break
                answer += chunk
        if HEADER_END not in answer:
            return None
        head, _, rest = answer.partition(HEADER_END)
        headers = parse_headers(head)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            rest = read_chunked(_NoSocket(), rest)[0]
        elif "content-length" in headers:
            if method == "HEAD":
                return head + HEADER_END  # a HEAD's length is the object's, and it has no body
            rest = rest[:int(headers["content-length"])]
        return reframe(head, rest) + HEADER_END + rest

    def _control(self, method, command):
        if command == "counts":
            with self._lock:
                document = {"requests": dict(self.counts), "total": sum(self.counts.values()),
                            "by_bucket": {name: dict(counts) for name, counts in self.by_bucket.items()},
                            "faults": dict(self.faults)}
        elif command == "journal":  # [[unix time, operation, bucket, key], ...] since the last reset
            with self._lock:
                document = {"journal": list(self.journal or [])}
        elif command == "reset" and method == "POST":
            with self._lock:
                self.counts.clear()
                self.by_bucket.clear()
                self.faults.clear()
                if self.journal is not None:
                    self.journal.clear()
            document = {"reset": True}
        elif command == "die" and method == "POST":
            threading.Timer(0.05, self.die).start()  # after this answer has gone out
            document = {"dying": True}
        else:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        payload = json.dumps(document).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(payload) + payload)


class _NoSocket:
    """read_chunked on a message already read whole."""

    def recv(self, _size):
        return b""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="the S3 server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to every request (default %(default)s)")
    parser.add_argument("--reset-every", type=int, default=0, help="reset every Nth connection (0: never)")
    parser.add_argument("--slowdown-every", type=int, default=0, help="503 SlowDown every Nth request (0: never)")
    parser.add_argument("--journal", action="store_true", help="keep every request's time, for GET /__proxy__/journal")
    parser.add_argument("--ignore-conditions", action="store_true",
                        help="strip If-None-Match and If-Match: an endpoint that ignores conditional writes")
    args = parser.parse_args(argv)
    if urlsplit(args.upstream).hostname not in ("127.0.0.1", "localhost"):
        parser.error("the upstream must be on loopback")
    proxy = Proxy(args.upstream, args.port, args.delay_ms, args.reset_every, args.slowdown_every, args.journal,
                  args.ignore_conditions)
    print(f"listening on {proxy.url}", flush=True)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
