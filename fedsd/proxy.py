"""The device-facing port of `fedsd server start`: a small reverse proxy that passes the Fleet API only.

Flower 1.42's SuperLink serves three APIs on one HTTP(S) port (``flwr/superlink/main.py``
``include_router`` of the control, fleet and runtime routers): the Fleet API (``/v1/fleet/*``, what
SuperNodes speak: protobuf over HTTP POST, ``flwr/supernode/fleet_http_client.py``), the Control API
(``/v1/control/*``: ``flwr run``, ``flwr stop``, ``flwr supernode register``, open to anyone without an
OIDC plug-in) and the Runtime API (``/v1/runtime/*``, for its own ServerApp processes). So the SuperLink
binds loopback only, and devices reach this proxy instead, which

- terminates TLS with the server's certificate (or serves plain HTTP for ``--insecure``);
- forwards ``POST /v1/fleet/<method>`` (a strict path pattern; no ``..``, no encoded slashes), with its
  headers (node authentication signs requests in headers) and body, to the SuperLink on loopback —
  over TLS verified against the server's CA when the SuperLink serves TLS;
- forwards anything else only for peers on this machine (loopback), so ``fedsd server register-node
  --port`` keeps working locally; a remote peer gets ``403`` and the SuperLink never sees the request.

Run: ``python -m fedsd.proxy --listen HOST:PORT --upstream URL [--certfile F --keyfile F] [--cafile F]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
"""The Fleet API methods (``flwr/superlink/routers/fleet/router.py``: register-node, pull-messages, ...)."""

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip

MAX_BODY = 512 * 1024 * 1024
"""Largest request forwarded (a model delivery travels as objects of a few MB each)."""

log = logging.getLogger("fedsd.proxy")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def allowed(method: str, path: str, raw_path: bytes, peer: str | None) -> bool:
    """May this request reach the SuperLink? Fleet calls from anyone; the rest from this machine only."""
    if is_loopback(peer):
        return True
    if method != "POST" or b"%" in raw_path or b"//" in raw_path:
        return False
    return FLEET_PATH.fullmatch(path) is not None and raw_path.decode("latin-1") == path


def make_app(upstream: str, cafile: str | None = None, timeout_s: float = 600.0) -> Any:
    """The Starlette app forwarding allowed requests to ``upstream`` (``http(s)://127.0.0.1:PORT``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    verify: Any = cafile if cafile else True
    client_box: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        if "c" not in client_box:
            client_box["c"] = httpx.AsyncClient(
                base_url=upstream, verify=verify, timeout=httpx.Timeout(timeout_s, connect=10.0)
            )
        return client_box["c"]

    async def forward(request: Request) -> Response:
        peer = request.client.host if request.client else None
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        if not allowed(request.method, request.url.path, raw_path, peer):
            log.warning("refused %s %s from %s", request.method, request.url.path[:200], peer)
            return PlainTextResponse("fedsd: only the Fleet API is served on this port\n", status_code=403)
        body = await request.body()
        if len(body) > MAX_BODY:
            return PlainTextResponse("fedsd: request too large\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            upstream_reply = await client().request(
                request.method,
                request.url.path,
                params=request.url.query or None,
                content=body,
                headers=headers,
            )
        except httpx.HTTPError as e:
            log.warning("upstream %s failed: %s", request.url.path[:200], e)
            return PlainTextResponse("fedsd: the SuperLink did not answer\n", status_code=502)
        out_headers = {k: v for k, v in upstream_reply.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers.pop("content-encoding", None)  # httpx decoded the body already
        return Response(upstream_reply.content, status_code=upstream_reply.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        if "c" in client_box:
            await client_box["c"].aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedsd's Fleet-only reverse proxy in front of a SuperLink")
    parser.add_argument("--listen", required=True, help="HOST:PORT devices connect to")
    parser.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9092")
    parser.add_argument("--certfile", help="server certificate (TLS towards devices)")
    parser.add_argument("--keyfile", help="server key")
    parser.add_argument("--cafile", help="CA that verifies the SuperLink's certificate (TLS upstream)")
    args = parser.parse_args(argv)
    import uvicorn

    from fedsd.processes import set_parent_death_signal

    set_parent_death_signal()
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(
        make_app(args.upstream, args.cafile),
        host=host,
        port=int(port),
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        proxy_headers=False,  # the peer address decides what is forwarded: never trust X-Forwarded-For
        server_header=False,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    print(f"fedsd fleet proxy on {args.listen} → {args.upstream}", flush=True)
    server.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
