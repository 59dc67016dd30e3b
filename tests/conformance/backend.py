"""A third-party HTTP/1.1 backend for tests/conformance.rs: Python's standard library server.

GET /echo            -> JSON: the request line and every header line as received (in order)
GET /cookies         -> JSON: the cookies as a WSGI app reads them (duplicate header lines
                        joined with ", ", then parsed by http.cookies.SimpleCookie)
GET /many?n=N        -> 200 with N extra header lines
GET /big?kb=K        -> 200 with one header of K KiB
POST /echo           -> JSON: the body as received (Content-Length or chunked)
GET /query?...       -> JSON: the query as parse_qs reads it
GET /count           -> JSON: how many requests this server has read (this one excluded)
GET /hints?n=N       -> N `103 Early Hints` (each with a `Link` line, 50 ms apart), then 200
POST /hints/...      -> the same, after reading the body (a sale route's buy)
GET /interim?status=S&then=T
                     -> a bare informational `S` (100 or 102) as the only answer, then
                        T=close: closes the connection; T=hang: sends nothing more for 3 s

Prints the port it listens on (127.0.0.1, ephemeral) as its first line.
"""
import json
import sys
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


COUNT = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def parse_request(self):
        global COUNT
        ok = super().parse_request()
        if ok and self.path != "/count":
            COUNT += 1
        return ok

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self):
        body = self.read_body()
        url = urlsplit(self.path)
        if url.path.startswith("/hints"):
            self.hints(parse_qs(url.query))
        else:
            self.reply({"line": self.requestline, "body": body.decode("latin-1")})

    def hints(self, query):
        for i in range(int(query.get("n", ["1"])[0])):
            self.wfile.write(
                b"HTTP/1.1 103 Early Hints\r\n"
                + f"Link: </style{i}.css>; rel=preload; as=style\r\n\r\n".encode()
            )
            self.wfile.flush()
            time.sleep(0.05)
        self.reply({"hints": "sent"}, [("Link", "</style0.css>; rel=preload; as=style")])

    def log_message(self, *args):
        pass

    def reply(self, body, extra=()):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/echo":
            self.reply({"line": self.requestline, "headers": list(self.headers.items())})
        elif url.path == "/cookies":
            joined = ", ".join(self.headers.get_all("Cookie") or [])
            jar = SimpleCookie()
            jar.load(joined)
            self.reply({name: morsel.value for name, morsel in jar.items()})
        elif url.path == "/many":
            n = int(query.get("n", ["0"])[0])
            self.reply({"n": n}, [(f"X-Line-{i}", str(i)) for i in range(n)])
        elif url.path == "/query":
            self.reply({"path": url.path, "query": parse_qs(url.query)})
        elif url.path == "/count":
            self.reply({"count": COUNT})
        elif url.path == "/hints":
            self.hints(query)
        elif url.path == "/interim":
            status = int(query.get("status", ["100"])[0])
            reason = {100: "Continue", 102: "Processing"}.get(status, "Info")
            self.wfile.write(f"HTTP/1.1 {status} {reason}\r\n\r\n".encode())
            self.wfile.flush()
            if query.get("then", ["close"])[0] == "hang":
                time.sleep(3)
            self.close_connection = True
        elif url.path == "/big":
            kb = int(query.get("kb", ["0"])[0])
            self.reply({"kb": kb}, [("X-Big", "b" * (kb * 1024))])
        else:
            self.send_error(404)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
