"""The explorer over HTTP: waitress, an origin policy, security headers, and the page.

Why waitress (Pylons' pure-Python WSGI server; maintained, one dependency and no others): the work behind the routes
is synchronous torch code around one model lock, so what bounds the server is a fixed pool of worker threads, not an
event loop. Waitress has exactly that (`threads`), and its single I/O thread buffers each request in full before a
worker sees it, so a slow or stalled client never holds a worker; it refuses a Content-Length that is over the limit
(413) or not digits (400) before reading the body, closes connections idle for `channel_timeout`, caps open
connections and sets the listen backlog; responses are buffered too (in memory up to 4 MB: waitress's default of
1 MB sent every grid through a temporary file, which cost more than the rest of a cached answer), so a client that
does not read holds no worker either. Starlette/uvicorn would add an event loop we do not need (the routes would
run on its thread pool anyway) and uvicorn bounds neither request bodies nor the time a client may take to send a
request (slowloris; its keep-alive timeout is reset by every byte received, encode/uvicorn#157): both would have to
be written here. Flask would add a dependency for the dozen lines of routing below.

Added here on top of waitress: deadlines for receiving a request (its line and headers within Limits.header_timeout,
all of it within Limits.request_timeout: a client that drips a byte now and then is closed), a fair share of the
connections (at most Limits.connections_per_address from one address; over a cap, the connection that has kept the
server waiting longest on its client is closed to make room, so slow clients never lock out one that sends its
request at once: waitress only stops accepting), a request with ambiguous framing (Content-Length beside
Transfer-Encoding) refused and its connection closed, JSON bodies for waitress's own refusals, and the policy:
- the Host header must name the served address (plus --allow-origin's), so a page of another site that reaches
  this server through a DNS name of its own (DNS rebinding) is refused;
- a request carrying an Origin must come from the page of the address it was sent to (its Origin is http:// and
  its Host header) or an --allow-origin origin; a cross-site or same-site request that is not from an
  --allow-origin origin is refused by its Sec-Fetch-Site, with or without an Origin (an <img> or a no-cors fetch
  of another site's page sends none);
- every response: nosniff, no referrer, not framable, Cross-Origin-Resource-Policy same-origin, no-store; the page
  has a strict Content-Security-Policy (its one script and one style allowed by their SHA-256, nothing inline
  else, images from this server and blob: URLs only) and puts every name in the DOM as text.
"""

from __future__ import annotations

import base64
import hashlib
import http
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from .cache import HttpError, Pending

log = logging.getLogger("lightning_vis.explorer")
PAGE = Path(__file__).with_name("page.html")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}
_DEFAULT_PORT = {"http": 80, "https": 443}
SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                    ("X-Frame-Options", "DENY"), ("Cross-Origin-Resource-Policy", "same-origin"),
                    ("Cross-Origin-Opener-Policy", "same-origin"), ("Cache-Control", "no-store")]
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_origin(origin: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an origin "http(s)://host[:port]"; ValueError saying what is wrong otherwise."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in _DEFAULT_PORT or not parts.hostname or parts.username is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"{origin!r} is not an origin: give scheme, host and port, e.g. http://dashboard.lan:8080")
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORT[parts.scheme]


class OriginPolicy:
    """Which Host and Origin headers this server answers. Host: the address it serves (a loopback bind also answers
    to localhost, 127.0.0.1 and [::1]; a bind to every interface to any IP address and this machine's names), on
    its port, plus the origins allowed explicitly. Origin: the page of the very address the request was sent to
    (http:// and its Host), or an origin allowed explicitly (whose pages get CORS headers)."""

    def __init__(self, host: str, port: int, allow_origins=()):
        self.port = port
        host = host.strip("[]").lower()
        self.any_ip = host in _WILDCARD
        names = {host}
        if self.any_ip or host in _LOOPBACK or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
            names |= _LOOPBACK
        if self.any_ip:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = names - {""}
        self.url = f"http://{_bracket('127.0.0.1' if self.any_ip else host)}:{port}"
        self.origins, self.extra = set(), set()
        for o in allow_origins:
            scheme, h, p = parse_origin(o)
            self.origins.add(f"{scheme}://{_bracket(h)}:{p}")
            self.extra.add((h, p))

    def served(self, host: str, port: int) -> bool:
        if (host, port) in self.extra:
            return True
        return port == self.port and (host in self.names or (self.any_ip and _is_ip(host)))

    def check(self, environ) -> str | None:
        """Raises HttpError 400/403 for a request this server must not answer; returns the origin to echo in
        Access-Control-Allow-Origin (an --allow-origin origin), else None."""
        raw = environ.get("HTTP_HOST")
        if not raw:
            raise HttpError(400, "missing Host header")
        try:
            parts = urlsplit("//" + raw)
            host, port = (parts.hostname or "").lower(), parts.port or 80
        except ValueError:
            raise HttpError(400, f"malformed Host header {raw[:100]!r}") from None
        if not host or not self.served(host, port):
            raise HttpError(403, f"Host {raw[:100]!r} is not this explorer's address ({self.url}): refused (a page of "
                            "another site reaching this server under a DNS name of its own, DNS rebinding, is refused "
                            "this way); to serve it under another name, start it with --allow-origin http://NAME:PORT")
        origin = environ.get("HTTP_ORIGIN")
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if origin is not None:
            try:
                scheme, h, p = parse_origin(origin)
            except ValueError:
                scheme = None
            norm = f"{scheme}://{_bracket(h)}:{p}" if scheme else None
            if norm in self.origins:
                return norm
            # same-origin: the page's origin is the address this request was sent to (its Host), not any address
            # this server answers (bound to every interface, that is every IP address)
            if scheme != "http" or (h, p) != (host, port):
                raise HttpError(403, f"requests from pages of {origin[:100]!r} are refused: only this explorer's "
                                f"own page (http://{raw[:100]}) and the origins given with --allow-origin may use it")
        if site in ("cross-site", "same-site"):
            raise HttpError(403, f"a {site} request (from a page of another site) is refused")
        return None


def page_and_csp(path: Path = PAGE) -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that allows exactly its inline <script> and <style> blocks (by their
    SHA-256) and nothing else inline."""
    html = path.read_text(encoding="utf-8")

    def hashes(tag):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self' blob:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), csp


class App:
    """The WSGI application: the policy, then the routes of Explorer (see server.py for the API)."""

    def __init__(self, explorer, policy: OriginPolicy | None):
        self.explorer, self.policy = explorer, policy
        self.page, self.csp = page_and_csp()

    def __call__(self, environ, start_response):
        headers = list(SECURITY_HEADERS)
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            cors = self.policy.check(environ)
            if cors:
                headers += [("Access-Control-Allow-Origin", cors), ("Vary", "Origin")]
            if method == "OPTIONS":  # a CORS preflight of an allowed origin
                headers += [("Access-Control-Allow-Methods", "GET, POST"), ("Allow", "GET, HEAD, POST, OPTIONS"),
                            ("Access-Control-Allow-Headers", "Content-Type"), ("Access-Control-Max-Age", "600")]
                status, kind, body = 204, None, b""
            else:
                status, kind, body = self.route(method, environ)
        except Pending as e:
            headers += list(e.headers.items())
            status, kind, body = e.status, "application/json", json.dumps({"pending": True, "message": str(e)})
        except HttpError as e:
            headers += list(e.headers.items())
            status, kind, body = e.status, "application/json", json.dumps({"error": str(e)})
        except Exception as e:  # never a traceback to the client
            log.exception("lightning-vis explorer: %s %s failed", method, environ.get("PATH_INFO"))
            status, kind, body = 500, "application/json", json.dumps({"error": f"internal error: {type(e).__name__}"})
        body = body.encode() if isinstance(body, str) else body
        headers.append(("Content-Security-Policy", self.csp if kind and kind.startswith("text/html") else API_CSP))
        if kind:
            headers.append(("Content-Type", kind))
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} {http.HTTPStatus(status).phrase}", headers)
        return [] if method == "HEAD" else [body]

    def route(self, method: str, environ):
        ex = self.explorer
        path = environ.get("PATH_INFO", "")
        if method == "POST":
            if path != "/api/upload":
                raise HttpError(404, f"no POST route {path}")
            length = int(environ.get("CONTENT_LENGTH") or 0)  # waitress has refused what is not digits
            if length > ex.limits.upload_bytes:
                raise HttpError(413, f"upload of {length} bytes is over the {ex.limits.upload_bytes} byte limit")
            return 200, "application/json", json.dumps({"name": ex.upload(environ["wsgi.input"].read(length))})
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {method} not allowed: GET or POST (uploads)",
                            headers={"Allow": "GET, HEAD, POST, OPTIONS"})
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.page
        if path == "/api/model":
            return 200, "application/json", json.dumps(ex.model_info())
        if path == "/api/images":
            return 200, "application/json", json.dumps({"images": ex.names()})
        try:
            q = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                                  max_num_fields=32).items()}
        except ValueError:
            raise HttpError(400, "too many query parameters (at most 32)") from None

        def need(key):
            if not q.get(key):
                raise HttpError(400, f"missing parameter {key!r}")
            return q[key]

        def integer(key, default=None, required=False):
            if not q.get(key):
                if required:
                    raise HttpError(400, f"missing parameter {key!r}")
                return default
            if not re.fullmatch(r"[+-]?\d{1,40}", q[key].strip()):
                raise HttpError(400, f"parameter {key!r} must be an integer, got {q[key][:40]!r}")
            return int(q[key])

        png = "image/png"
        frame = integer("frame")
        if frame is not None:
            ex._frame(frame, 1)  # 400 unless 0 <= frame < the clips' frames (0 for an image model)
        if path == "/api/image":
            return 200, png, ex.image_png(need("image"), frame)
        if path == "/api/predictions":
            return 200, "application/json", json.dumps(ex.predictions(need("image"), integer("k", 5)))
        if path == "/api/featureviz":
            return 200, png, ex.featureviz_png(ex.layer(q.get("layer")), integer("filter", required=True))
        if path == "/api/topk":
            return 200, "application/json", json.dumps(ex.topk(ex.layer(q.get("layer")),
                                                               integer("filter", required=True)))
        if path == "/api/projections":
            return 200, png, ex.projections_png(ex.layer(q.get("layer")), integer("filter", required=True),
                                                q.get("rule") or None)
        if path not in ("/api/cam", "/api/attribution", "/api/faithfulness", "/api/activations", "/api/grid",
                        "/api/deconv", "/api/occlusion-study"):
            raise HttpError(404, f"no route {path}")
        image = need("image")
        ex._picture(image)  # 404 for an unknown image, before any work
        layer = ex.layer(q.get("layer"))
        if path in ("/api/cam", "/api/attribution"):
            # every other parameter is the method's own (steps, window, ...): checked against what it takes
            params = {k: v for k, v in q.items() if k not in ("image", "layer", "class", "method", "frame")}
            return 200, png, ex.cam_png(image, layer, integer("class"), q.get("method") or "gradcam", frame, params)
        if path == "/api/faithfulness":
            return 200, "application/json", json.dumps(ex.faithfulness(image, layer, integer("class")))
        if path == "/api/occlusion-study":
            return 200, png, ex.occlusion_study_png(image, layer, integer("class"), integer("window"),
                                                    integer("stride"))
        if path == "/api/activations":
            overlay = q.get("overlay", "0") == "1"
            return (200, "image/jpeg" if overlay else png,
                    ex.activation_png(image, layer, q.get("scale") or "per_image", overlay, frame))
        if path == "/api/grid":
            return 200, "application/json", json.dumps(ex.grid_info(image, layer))
        return 200, png, ex.deconv_png(image, layer, integer("filter", required=True), q.get("rule") or None)


# ------------------------------------------------------------------------------------------------------ waitress
class _JsonErrorTask(ErrorTask):
    """waitress's own refusals (malformed or oversized requests), as JSON with a message that says the limit."""

    def execute(self):
        e, adj = self.request.error, self.channel.server.adj
        message = {413: f"request body over the {adj.max_request_body_size - 1} byte limit (uploads: at most "
                        f"{(adj.max_request_body_size - 1) >> 20} MB)",
                   431: f"request line and headers over the {adj.max_request_header_size} byte limit",
                   400: f"malformed request: {e.body}", 501: f"malformed request: {e.body}"}.get(e.code, e.body)
        code = 400 if e.code == 501 else e.code  # an unsupported Transfer-Encoding is the client's mistake
        body = json.dumps({"error": message}).encode()
        self.status = f"{code} {http.HTTPStatus(code).phrase}"
        self.response_headers.extend([("Content-Type", "application/json"), *SECURITY_HEADERS,
                                      ("Content-Security-Policy", API_CSP)])
        self.set_close_on_finish()
        # closing: no "Connection: Keep-Alive" beside the "close" (waitress adds it for an HTTP/1.0 keep-alive request)
        self.request.headers.pop("CONNECTION", None)
        self.content_length = len(body)
        self.write(body)


class _Parser(HTTPRequestParser):
    """waitress's parser, refusing a request whose framing two parties could read two ways (RFC 9112 section 6.1):
    Content-Length beside Transfer-Encoding, or Transfer-Encoding in an HTTP/1.0 request (which waitress frames by
    Content-Length). A proxy in front that reads the other header would see a second request smuggled in the body;
    the refusal closes the connection (as every error of waitress's does), so nothing after it is answered."""

    def parse_header(self, header_plus):
        super().parse_header(header_plus)  # an HTTP/1.1 request's Transfer-Encoding is popped: `chunked` says it
        if (self.chunked and "CONTENT_LENGTH" in self.headers) or "TRANSFER_ENCODING" in self.headers:
            raise ParsingError("a request with Transfer-Encoding must have no Content-Length and be HTTP/1.1 (its "
                               "framing is ambiguous: refused, and the connection closed)")


class _Channel(HTTPChannel):
    """A connection that remembers when its current request began arriving, and reads nothing more once a request
    of it was refused (the connection closes after that answer)."""

    error_task_class = _JsonErrorTask
    parser_class = _Parser
    request_started = 0.0
    peer = ""  # the client it counts against (see _peer), set when accepted
    serving = False  # a worker thread is in service(): answering a request of it
    served = 0.0  # when (time.monotonic) a worker last finished answering it

    def service(self):
        # waitress pops the answered request before it stamps last_activity: without this flag the connection
        # would look idle since its request arrived (seconds ago for a slow route) for that moment
        self.serving = True
        try:
            super().service()
        finally:
            self.served = time.monotonic()
            self.serving = False

    def received(self, data):
        if any(r.error is not None for r in self.requests):
            return False  # closing: whatever follows a refused request is never parsed nor answered
        before, now = self.request, time.monotonic()
        try:
            return super().received(data)
        finally:
            # a request begun in this data, also one pipelined behind a request it completed, began now
            if self.request is not None and self.request is not before:
                self.request_started = now

    def waiting_since(self, now: float) -> float | None:
        """Since when (time.monotonic) this connection has kept the server waiting on its client: sending a request
        (since its first byte), idle, or not reading its answer (since the last byte sent); None while a request of
        it is being answered or waits for a worker."""
        if self.requests or self.serving:
            return None
        if self.request is not None:
            return self.request_started
        return max(self.served, now - max(0.0, time.time() - self.last_activity))


def _peer(addr) -> str:
    """The client a connection counts against: its IPv4 address, or its IPv6 /64 (one host's usual share)."""
    host = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Server(TcpWSGIServer):
    """waitress's server with deadlines and a fair share of connections for every client.

    Deadlines (checked once a second): the request line and headers must arrive within `header_timeout` of their
    first byte, the whole request within `request_timeout`. Connections: at most `per_address` from one client
    address and `connections` in all. A connection over either cap does not wait in the backlog behind the ones
    holding the slots: the connection that has kept the server waiting longest on its client (dripping a request,
    idle, or not reading its answer) is closed to make room, of the same address for the per-address cap, of any
    for the total; a connection whose request is being answered is never closed (a new one over the per-address cap
    with nothing else to close is refused). So slow clients, from however many addresses, only ever take slots
    from each other: a client that sends its request at once is answered."""

    channel_class = _Channel
    request_timeout = 60.0
    header_timeout = 5.0
    connections = 100
    per_address = 32
    _warned = -math.inf

    def maintenance(self, now):
        super().maintenance(now)  # closes connections idle for channel_timeout
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            request = channel.request
            if request is None or channel.requests:
                continue
            late = mono - channel.request_started
            if late > self.request_timeout or (not request.headers_finished and late > self.header_timeout):
                channel.will_close = True  # still sending one request after its deadline: a drip

    def _longest_waiting(self, peer: str | None = None):
        now = time.monotonic()
        waiting = [(since, ch) for ch in self.active_channels.values() if not ch.will_close
                   and (peer is None or ch.peer == peer) and (since := ch.waiting_since(now)) is not None]
        return min(waiting, key=lambda p: p[0])[1] if waiting else None

    def readable(self):
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        # at the cap, a new connection is accepted only where one waiting on its client can make room
        return self.accepting and (len(self.active_channels) < self.connections
                                   or self._longest_waiting() is not None)

    def handle_accept(self):
        try:
            pair = self.accept()
            if pair is None:
                return
            conn, addr = pair
            self.set_socket_options(conn)
        except OSError:
            return  # the client went away before it was accepted
        new = self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
        peer = new.peer = _peer(new.addr)
        if sum(ch.peer == peer for ch in self.active_channels.values()) > self.per_address:
            self._make_room(self._longest_waiting(peer) or new, f"{self.per_address} connections from {peer}")
        if len(self.active_channels) > self.connections:
            self._make_room(self._longest_waiting() or new, f"{self.connections} connections")

    def _make_room(self, channel, cap: str):
        if time.monotonic() - self._warned > 60:  # once a minute at most: a flood must not flood the log
            self._warned = time.monotonic()
            log.warning("lightning-vis explorer: over the cap of %s: closing the connections that keep it waiting "
                        "longest (slow or idle clients)", cap)
        channel.handle_close()


class _Dispatcher(ThreadedTaskDispatcher):
    # waitress warns on every request that waits for a worker: under load that is expected, not news
    queue_logger = logging.getLogger("lightning_vis.explorer.queue")


logging.getLogger("lightning_vis.explorer.queue").setLevel(logging.ERROR)


class ExplorerServer:
    """The explorer's HTTP server: ``serve_forever()`` (blocks), ``shutdown()`` (from another thread: stops it and
    waits), ``server_close()``, ``server_address`` and ``url``."""

    def __init__(self, explorer, host: str, port: int, *, allow_origins=(), timeout: float | None = None):
        for origin in allow_origins:
            parse_origin(origin)  # a bad origin is refused before the socket is bound
        lim = explorer.limits
        timeout = lim.timeout if timeout is None else timeout
        self.explorer = explorer
        self.adj = Adjustments(host=host, port=port, threads=lim.threads, backlog=lim.backlog,
                               connection_limit=lim.connections, channel_timeout=max(1, math.ceil(timeout)),
                               cleanup_interval=1, max_request_body_size=lim.upload_bytes + 1,
                               max_request_header_size=lim.header_bytes, ident="lightning-vis",
                               expose_tracebacks=False, outbuf_overflow=4 << 20)
        dispatcher = _Dispatcher()
        dispatcher.set_thread_count(lim.threads)
        self._map: dict = {}
        app = App(explorer, None)  # its policy needs the port bound
        self._server = _Server(app, map=self._map, dispatcher=dispatcher, adj=self.adj, sockinfo=self.adj.listen[0])
        self._server.request_timeout = max(timeout, lim.request_timeout)
        self._server.header_timeout = min(lim.header_timeout, self._server.request_timeout)
        self._server.connections, self._server.per_address = lim.connections, lim.connections_per_address
        self.policy = app.policy = OriginPolicy(host, int(self._server.effective_port), allow_origins)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._closed = False

    @property
    def server_address(self) -> tuple[str, int]:
        return self._server.effective_host, int(self._server.effective_port)

    @property
    def url(self) -> str:
        return self.policy.url

    def serve_forever(self):
        self._stopped.clear()
        try:
            while not self._stop.is_set() and self._map:
                wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map, count=1)
        finally:
            self._stopped.set()

    def shutdown(self):
        self._stop.set()
        try:
            self._server.pull_trigger()  # wakes the loop
        except OSError:
            pass
        self._stopped.wait(10)
        self.server_close()

    def server_close(self):
        if self._closed or not self._stopped.is_set():
            return
        self._closed = True
        wasyncore.close_all(self._map)
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self.explorer.close()


def make_server(explorer, host: str = "127.0.0.1", port: int = 8000, *, allow_origins=(),
                timeout: float | None = None) -> ExplorerServer:
    """The explorer's server bound to host:port (port 0: any free port), not yet serving. allow_origins: pages of
    these origins ("http://host:port") may use it too. timeout: overrides explorer.limits.timeout (seconds)."""
    return ExplorerServer(explorer, host, port, allow_origins=allow_origins, timeout=timeout)


def run_until_interrupted(server: ExplorerServer, about: str = "") -> ExplorerServer:
    """Says where the explorer listens, serves until Ctrl-C, then closes the socket."""
    extra = f"; also for pages of {', '.join(sorted(server.policy.origins))}" if server.policy.origins else ""
    print(f"lightning-vis explorer on {server.url}/ ({about + '; ' if about else ''}Ctrl-C stops it{extra})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._stop.set()
        server.server_close()
    return server

