"""A FastAPI backend for tests/bypass_matrix.rs, served by uvicorn.

Idiomatic FastAPI: typed path/query/header parameters and a pydantic model for the JSON
body (so a value of the wrong type is a 422 before the handler runs). Starlette routes on the
decoded path and redirects a trailing slash. A method override (a header, or `_method` in
the query) wraps the app as ASGI middleware. Prints "LISTENING <port>" once bound.
"""
import json
import socket
import sys
import threading
from typing import Optional
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Header, Request
from pydantic import BaseModel

app = FastAPI()
seen = []
lock = threading.Lock()
BUY_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


def record(request: Request, route, sku, quantity):
    h = request.headers
    rec = {
        "route": route,
        "method": request.method,
        "reservation": h.get("x-flashgate-reservation"),
        "x_sku": h.get("x-flashgate-sku"),
        "x_qty": h.get("x-flashgate-quantity"),
        "sku": sku,
        "qty": None if quantity is None else str(quantity),
    }
    with lock:
        seen.append(rec)
    return {"bought": True}


@app.api_route("/api/flash/{sku}/buy", methods=BUY_METHODS)
async def buy_path(sku: str, request: Request):
    return record(request, "path", sku, None)


@app.api_route("/api/flash-q/buy", methods=BUY_METHODS)
async def buy_query(request: Request, sku: Optional[str] = None, quantity: Optional[int] = None):
    return record(request, "query", sku, quantity)


@app.api_route("/api/flash-h/buy", methods=BUY_METHODS)
async def buy_header(
    request: Request, x_sku: Optional[str] = Header(None), x_qty: Optional[int] = Header(None)
):
    return record(request, "header", x_sku, x_qty)


class Order(BaseModel):
    sku: str
    quantity: int


@app.api_route("/api/flash-j/buy", methods=BUY_METHODS)
async def buy_json(order: Order, request: Request):
    return record(request, "json", order.sku, order.quantity)


@app.get("/__seen")
async def drain():
    global seen
    with lock:
        out, seen = seen, []
    return out


class MethodOverride:
    """A POST may name another method in a header or `_method` query parameter."""

    HEADERS = {b"x-http-method-override", b"x-http-method", b"x-method-override"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"].upper() == "POST":
            method = None
            for k, v in scope["headers"]:
                if k.lower() in self.HEADERS:
                    method = v.decode("latin-1")
            q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            method = (q.get("_method") or [method])[0]
            if method:
                scope = dict(scope, method=method.upper())
        await self.app(scope, receive, send)


if __name__ == "__main__":
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Listening before the port is announced: connections queue until uvicorn accepts.
    sock.listen(128)
    config = uvicorn.Config(MethodOverride(app), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])
