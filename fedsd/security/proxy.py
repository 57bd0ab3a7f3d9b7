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

Everything here runs before any authentication (the SuperLink checks node signatures), so what one
peer can make the proxy hold is bounded (:class:`Limits`): the body is *streamed* to the SuperLink in
small chunks with the size cap counted while reading (a ``Content-Length`` above the cap gets ``413``
before a byte of body is read; a chunked body gets ``413`` the moment it passes the cap), so memory
grows with the number of connections, never with body sizes; open connections are capped (the next one
gets ``503``); a request head has a size cap (``431``) and must arrive within a deadline, a body must
keep a minimum rate, and an idle keep-alive connection is closed (slowloris). It is a plain asyncio
server on h11 rather than uvicorn, because uvicorn has no deadline for a request head and reads each
socket in 256 KiB pieces.

Run: ``python -m fedsd.security.proxy --listen HOST:PORT --upstream URL [--certfile F --keyfile F] [--cafile F]``
(``--help`` lists the limits).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import signal
import ssl
import sys
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11

from fedsd.security.proxy_limits import (  # noqa: F401  (re-exported: the proxy's public names)
    FLEET_PATH,
    HOP_BY_HOP,
    MAX_BODY,
    READ_BUDGET,
    READ_MAX,
    READ_MIN,
    TOO_MANY,
    Limits,
    _size,
    allowed,
    is_loopback,
)

log = logging.getLogger("fedsd.security.proxy")


class _Timeout(Exception):
    """The peer was too slow (head deadline, body rate, idle keep-alive, or reading our reply)."""


class _Refused(Exception):
    """The body broke a limit while streaming; ``status`` is the reply."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class _Gone(Exception):
    """The peer closed the connection mid-request."""


class FleetProxy:
    """The listening proxy: one :class:`_Connection` per device connection, all on one event loop."""

    def __init__(self, upstream: str, *, cafile: str | None = None, limits: Limits | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.cafile = cafile
        self.limits = limits or Limits()
        self.open = 0
        self.read_buffer = bytearray(READ_MAX)
        """One buffer every connection reads into: asyncio calls ``get_buffer`` and ``buffer_updated``
        back to back in one callback on this one thread, and the bytes are copied out right there."""
        self._client: Any = None
        self._server: asyncio.base_events.Server | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def client(self) -> Any:
        """One pooled httpx client towards the SuperLink (created on the loop that uses it)."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                verify=self.cafile if self.cafile else True,
                timeout=httpx.Timeout(self.limits.upstream_timeout_s, connect=10.0),
                limits=httpx.Limits(max_connections=self.limits.max_connections),
            )
        return self._client

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (0: any free port); returns the port. Connections are accepted here, not by
        ``asyncio.start_server``, so the connection cap holds before a TLS handshake spends memory."""
        import socket

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock, ssl_context))
        return int(sock.getsockname()[1])

    async def _accept_loop(self, sock: Any, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if self.open >= self.limits.max_connections:
                self._turn_away(conn, tls=ssl_context is not None)
                continue
            self.open += 1
            task = loop.create_task(self._run_connection(conn, ssl_context))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _turn_away(self, conn: Any, *, tls: bool) -> None:
        """Over the connection cap: a 503 on plain HTTP; under TLS just a close (a 503 would need a
        handshake, the very memory the cap refuses to spend). Devices retry either way."""
        with contextlib.suppress(OSError):
            if not tls:
                conn.send(TOO_MANY)
        with contextlib.suppress(OSError):
            conn.close()
        log.warning("turned away a connection: %d open (--max-connections)", self.open)

    async def _run_connection(self, conn: Any, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            protocol = _Connection(self)
            try:
                await loop.connect_accepted_socket(
                    lambda: protocol,
                    conn,
                    ssl=ssl_context,
                    ssl_handshake_timeout=self.limits.header_timeout_s if ssl_context else None,
                )
            except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
                with contextlib.suppress(OSError):
                    conn.close()
                return
            await protocol.serve()
        except Exception:  # one connection's bug must not stop the others
            log.exception("connection from %s failed", conn)
        finally:
            self.open -= 1

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        with contextlib.suppress(OSError):
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()


class _Connection(asyncio.BufferedProtocol):
    """One device connection: reads into the shared buffer, queues at most two reads (then stops
    reading, see ``READ_BUDGET``), parses with h11 and streams each request to the SuperLink and the reply back."""

    def __init__(self, proxy: FleetProxy) -> None:
        self.proxy = proxy
        self.limits = proxy.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self._buffer = proxy.read_buffer
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._eof = False
        self._paused = False
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else None

    def _read_size(self) -> int:
        return max(READ_MIN, min(READ_MAX, READ_BUDGET // max(1, self.proxy.open)))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[: self._read_size()]

    def buffer_updated(self, nbytes: int) -> None:
        self._queue.append(bytes(self._buffer[:nbytes]))  # copied out at once: the buffer is shared
        self._queued += nbytes
        if self._queued >= 2 * self._read_size() and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---------------------------------------------------------------- reading and writing
    async def _read(self, deadline: float) -> bytes:
        """The next bytes the peer sent (b"" at EOF); _Timeout past ``deadline`` (monotonic)."""
        while not self._queue and not self._eof:
            self._wake.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except TimeoutError:
                raise _Timeout from None
        if not self._queue:
            return b""
        data = self._queue.popleft()
        self._queued -= len(data)
        if self._paused and self._queued < self._read_size() and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def _event(self, deadline: float) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._read(deadline))

    async def _send(self, event: Any, deadline: float | None = None) -> None:
        """Write an h11 event; wait (until ``deadline``) while the peer is not reading."""
        data = self.h11.send(event)
        if self.transport is None or self.transport.is_closing():
            raise _Gone
        if data:
            self.transport.write(data)
        if not self._writable.is_set():
            left = (deadline if deadline is not None else time.monotonic() + self.limits.body_timeout_s) - (
                time.monotonic()
            )
            try:
                await asyncio.wait_for(self._writable.wait(), timeout=max(left, 0.0))
            except TimeoutError:
                raise _Timeout from None

    async def _reply(self, status: int, text: str, *, close: bool = True) -> None:
        body = text.encode()
        headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        with contextlib.suppress(h11.LocalProtocolError, _Gone, _Timeout):
            await self._send(
                h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
            )
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---------------------------------------------------------------- the request loop
    async def serve(self) -> None:
        first = True
        try:
            while True:
                request = await self._head(first)
                if request is None:
                    return
                keep = await self._handle(request)
                if not keep or self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
                first = False
        except (_Gone, ConnectionError):
            return
        finally:
            self._close()

    async def _head(self, first: bool) -> h11.Request | None:
        """The next request head within the limits; None when the connection should just close."""
        lim = self.limits
        deadline = time.monotonic() + (lim.header_timeout_s if first else lim.keep_alive_s)
        started = first
        while True:
            try:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self._read(deadline)
                    if data and not started:  # the first byte of a keep-alive request: its head is due now
                        started = True
                        deadline = time.monotonic() + lim.header_timeout_s
                    self.h11.receive_data(data)
                    continue
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint >= 400 else 400
                text = "request head too large" if status == 431 else "malformed request"
                if status == 431:
                    log.warning(
                        "refused a request head over %d bytes from %s", lim.max_header_bytes, self.peer
                    )
                await self._reply(status, f"fedsd: {text}\n")
                return None
            except _Timeout:
                if started and self.h11.their_state is h11.IDLE:
                    log.warning("timed out a slow request head from %s", self.peer)
                    await self._reply(408, "fedsd: request head not received in time\n")
                return None
            if isinstance(event, h11.Request):
                # h11 caps what it buffers of an incomplete head; a head completed by the read that
                # crossed the cap is measured here
                size = len(event.method) + len(event.target) + 12
                size += sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items())
                if size > lim.max_header_bytes:
                    log.warning(
                        "refused a request head over %d bytes from %s", lim.max_header_bytes, self.peer
                    )
                    await self._reply(431, "fedsd: request head too large\n")
                    return None
                return event
            return None  # ConnectionClosed, or anything unexpected

    def _body_deadline(self, start: float, received: int) -> float:
        return start + self.limits.body_timeout_s + received / self.limits.min_body_rate

    async def _handle(self, request: h11.Request) -> bool:
        """Forward one request (or refuse it); True when the connection may serve another."""
        method = request.method.decode("latin-1")
        target = bytes(request.target)
        raw_path = target.split(b"?", 1)[0]
        path = unquote(raw_path.decode("latin-1"))
        if not allowed(method, path, raw_path, self.peer):
            log.warning("refused %s %s from %s", method, path[:200], self.peer)
            await self._reply(403, "fedsd: only the Fleet API is served on this port\n")
            return False
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        if length is not None and length > self.limits.max_body:
            log.warning(
                "refused a body of %d bytes from %s (--max-body %d)", length, self.peer, self.limits.max_body
            )
            await self._reply(413, f"fedsd: request too large (over {self.limits.max_body} bytes)\n")
            return False
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        forward = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        if length is not None:
            forward.append(("content-length", str(length)))
        chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
        if chunked or length:
            content: Any = self._body()
        else:  # no body: h11 still owes us its end of message
            content = b""
            with contextlib.suppress(_Timeout, _Gone):
                async for _ in self._body():
                    pass
        client = self.proxy.client()
        import httpx

        upstream = client.build_request(
            method,
            httpx.URL(self.proxy.upstream).copy_with(raw_path=target),
            headers=forward,
            content=content,
        )
        try:
            reply = await client.send(upstream, stream=True)
        except _Refused as e:
            log.warning("refused %s from %s: %s", path[:200], self.peer, e.text.strip())
            await self._reply(e.status, e.text)
            return False
        except _Timeout:
            log.warning("timed out a slow body from %s", self.peer)
            await self._reply(408, "fedsd: request body not received in time\n")
            return False
        except _Gone:
            return False
        except httpx.HTTPError as e:
            log.warning("upstream %s failed: %s", path[:200], e)
            await self._reply(502, "fedsd: the SuperLink did not answer\n")
            return False
        try:
            return await self._relay(reply)
        finally:
            await reply.aclose()

    async def _body(self) -> Any:
        """The request body, chunk by chunk as it arrives, with the cap and the rate enforced."""
        start, received = time.monotonic(), 0
        while True:
            try:
                event = await self._event(self._body_deadline(start, received))
            except h11.RemoteProtocolError as e:
                raise _Refused(400, f"fedsd: malformed request body ({e})\n") from None
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > self.limits.max_body:
                    raise _Refused(413, f"fedsd: request too large (over {self.limits.max_body} bytes)\n")
                yield event.data if isinstance(event.data, bytes) else bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise _Gone

    async def _relay(self, reply: Any) -> bool:
        """The SuperLink's answer back to the peer, streamed; the peer must read it at the body rate."""
        headers = [(k, v) for k, v in reply.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        if "content-length" in reply.headers:  # raw bytes are relayed: the length holds, encoded or not
            headers.append((b"content-length", reply.headers["content-length"].encode("latin-1")))
        start, sent = time.monotonic(), 0
        try:
            await self._send(h11.Response(status_code=reply.status_code, headers=headers))
            async for chunk in reply.aiter_raw():
                sent += len(chunk)
                await self._send(h11.Data(data=chunk), self._body_deadline(start, sent))
            await self._send(h11.EndOfMessage(), self._body_deadline(start, sent))
        except _Timeout:
            log.warning("closed a connection that did not read its reply: %s", self.peer)
            return False
        except h11.LocalProtocolError as e:  # the SuperLink's headers/length did not add up
            log.warning("bad upstream reply: %s", e)
            return False
        except Exception as e:  # the SuperLink's stream broke midway: nothing sane left to send
            import httpx

            if isinstance(e, httpx.HTTPError):
                log.warning("upstream reply broke: %s", e)
                return False
            raise
        return True


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


async def serve(
    listen: tuple[str, int],
    upstream: str,
    *,
    cafile: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
    stop: asyncio.Event | None = None,
    on_listening: Any = None,
) -> None:
    """Run the proxy until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    proxy = FleetProxy(upstream, cafile=cafile, limits=limits)
    port = await proxy.start(listen[0], listen[1], ssl_context)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if on_listening is not None:
        on_listening(port)
    try:
        await stop.wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    d = Limits()
    parser = argparse.ArgumentParser(
        description="fedsd's Fleet-only reverse proxy in front of a SuperLink",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT devices connect to")
    parser.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9092")
    parser.add_argument("--certfile", help="server certificate (TLS towards devices)")
    parser.add_argument("--keyfile", help="server key")
    parser.add_argument("--cafile", help="CA that verifies the SuperLink's certificate (TLS upstream)")
    parser.add_argument(
        "--max-body", type=_size, default=d.max_body, help="largest request body (413 beyond)"
    )
    parser.add_argument(
        "--max-connections", type=int, default=d.max_connections, help="open connections (503 beyond)"
    )
    parser.add_argument(
        "--max-header-bytes", type=_size, default=d.max_header_bytes, help="request head (431 beyond)"
    )
    parser.add_argument(
        "--header-timeout", type=float, default=d.header_timeout_s, help="seconds for a request head"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=d.body_timeout_s, help="seconds a body may stall"
    )
    parser.add_argument(
        "--min-body-rate", type=_size, default=d.min_body_rate, help="bytes/s a body must keep"
    )
    parser.add_argument(
        "--keep-alive", type=float, default=d.keep_alive_s, help="seconds an idle connection stays"
    )
    args = parser.parse_args(argv)

    from fedsd.process.lifetime import set_parent_death_signal

    set_parent_death_signal()
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    try:
        limits = Limits(
            max_body=args.max_body, max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, min_body_rate=args.min_body_rate,
            keep_alive_s=args.keep_alive,
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ctx = server_ssl_context(args.certfile, args.keyfile) if args.certfile else None

    def listening(_port: int) -> None:
        print(f"fedsd fleet proxy on {args.listen} → {args.upstream}", flush=True)

    asyncio.run(serve((host, int(port)), args.upstream, cafile=args.cafile, ssl_context=ctx, limits=limits,
                      on_listening=listening))  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
