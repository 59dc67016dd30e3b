"""A Flask (Werkzeug) backend for tests/bypass_matrix.rs, on Werkzeug's own threaded server.

Flask's defaults: it routes on the decoded path, redirects a missing or extra trailing slash
(308), upper-cases the method and answers OPTIONS itself. A Rack-style method override (a
header, or `_method` in the query or a urlencoded form) wraps the app as WSGI middleware.
Prints "LISTENING <port>" once bound to 127.0.0.1:0.
"""
import io
import json
import sys
import threading
from urllib.parse import parse_qs

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

app = Flask(__name__)
seen = []
lock = threading.Lock()
BUY_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


def qty(v):
    """A quantity as the handler would use it: an int, else the raw value as JSON."""
    if v is None:
        return None
    if isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, int):
        return str(v)
    try:
        return str(int(v))
    except (TypeError, ValueError):
        return v if isinstance(v, str) else json.dumps(v)


def text(v):
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v)


def record(route, sku, quantity):
    rec = {
        "route": route,
        "method": request.method,
        "reservation": request.headers.get("X-Flashgate-Reservation"),
        "x_sku": request.headers.get("X-Flashgate-Sku"),
        "x_qty": request.headers.get("X-Flashgate-Quantity"),
        "sku": text(sku),
        "qty": qty(quantity),
    }
    with lock:
        seen.append(rec)
    return jsonify(bought=True)


@app.route("/api/flash/<sku>/buy", methods=BUY_METHODS)
def buy_path(sku):
    return record("path", sku, None)


@app.route("/api/flash-q/buy", methods=BUY_METHODS)
def buy_query():
    return record("query", request.args.get("sku"), request.args.get("quantity"))


@app.route("/api/flash-h/buy", methods=BUY_METHODS)
def buy_header():
    return record("header", request.headers.get("X-Sku"), request.headers.get("X-Qty"))


@app.route("/api/flash-j/buy", methods=BUY_METHODS)
def buy_json():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return record("json", None, None)
    return record("json", body.get("sku"), body.get("quantity"))


@app.route("/__seen")
def drain():
    global seen
    with lock:
        out, seen = seen, []
    return jsonify(out)


class MethodOverride:
    """Rack::MethodOverride, roughly: a POST may name another method."""

    HEADERS = ["HTTP_X_HTTP_METHOD_OVERRIDE", "HTTP_X_HTTP_METHOD", "HTTP_X_METHOD_OVERRIDE"]

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD", "").upper() == "POST":
            method = None
            for h in self.HEADERS:
                method = environ.get(h) or method
            q = parse_qs(environ.get("QUERY_STRING", ""))
            method = (q.get("_method") or [method])[0]
            if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
                n = int(environ.get("CONTENT_LENGTH") or 0)
                body = environ["wsgi.input"].read(n)
                environ["wsgi.input"] = io.BytesIO(body)
                f = parse_qs(body.decode("latin-1"))
                method = (f.get("_method") or [method])[0]
            if method:
                environ["REQUEST_METHOD"] = method.upper()
        return self.app(environ, start_response)


app.wsgi_app = MethodOverride(app.wsgi_app)

if __name__ == "__main__":
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"LISTENING {server.port}", flush=True)
    sys.stdout.flush()
    server.serve_forever()
