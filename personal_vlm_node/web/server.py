"""The web console's server: the page, a small JSON API and one websocket per page, on aiohttp.

It runs on a thread of its own with its own event loop, so the node's executor and frame worker
never wait for a browser. Every call into the node goes through a backend (``teach``, ``forget``,
``ask``, ``concepts``, ``pictures``, ``health``; :class:`personal_vlm_node.ros.web.NodeConsoleBackend`)
on a worker thread, since a teach or an ask waits in its line like a service request.

Safety: it listens on 127.0.0.1 unless told otherwise; with a token, every request and websocket
must carry it (``Authorization: Bearer …``, ``?token=…``, or the cookie a page opened with
``?token=…`` gets), else 401 and nothing more; request
bodies and websocket messages are size-limited; requests from another site's page are refused
(POSTs must be JSON, an ``Origin`` must be this server's); the files served are a fixed list, so no
client-supplied path reaches the filesystem.

Websocket messages to the page: JSON text ``{"type": "health" | "concepts" | "answer" | "error", …}``,
and each frame as one binary message (:func:`.live.packed_frame`). From the page: ``ask``,
``stop``, ``hold`` / ``release`` (a frame a box is being drawn on).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ..errors import PersonalVLMError
from .live import LiveView, packed_frame

MAX_REQUEST_BYTES = 64 * 1024        # a teach or forget request is a few hundred bytes
MAX_SOCKET_MESSAGE_BYTES = 16 * 1024
MAX_BOX_PIXELS = 1_000_000           # larger than any frame, and within a RegionOfInterest's uint32
HEALTH_PERIOD_S = 1.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
REQUEST_THREADS = 16                 # teach / ask / forget calls waiting in their lines at once
# The page's files, by URL path: nothing else is ever read from disk.
PAGE_FILES = {"/": ("index.html", "text/html"), "/console.js": ("console.js", "text/javascript"),
              "/console.css": ("console.css", "text/css")}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' ws: wss:; "
                               "frame-ancestors 'none'",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestError(PersonalVLMError):
    """A request the console cannot take as sent (400)."""


def _text(body: dict, key: str, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise RequestError(f"{key} must be text, got {type(value).__name__}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be true or false")
    return value


def parse_box(value):
    """The drawn box as four whole pixels (x, y, width, height), or None for no box. What the box
    says (empty, outside the frame) is checked where the services check a region of interest."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise RequestError("box must be four numbers: x, y, width, height (pixels)")
    box = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not 0 <= v <= MAX_BOX_PIXELS:
            raise RequestError(f"box values must be pixels in [0, {MAX_BOX_PIXELS}], got {value!r}")
        box.append(int(round(v)))
    return tuple(box)


class _Page:
    """One connected page: its outgoing messages in order, and the newest frame not yet sent (a
    slow page skips frames instead of queueing them)."""

    def __init__(self, socket: web.WebSocketResponse):
        self.socket = socket
        self.messages: deque = deque()
        self.frame: bytes | None = None
        self.ready = asyncio.Event()
        self.asking = False
        self.stop_asking = False
        self.held: int | None = None       # the frame number this page draws a box on

    def post(self, message: dict) -> None:
        self.messages.append(message)
        self.ready.set()

    def post_frame(self, data: bytes) -> None:
        self.frame = data
        self.ready.set()

    async def send_all(self) -> None:
        try:
            while not self.socket.closed:
                await self.ready.wait()
                self.ready.clear()
                while self.messages and not self.socket.closed:
                    await self.socket.send_str(json.dumps(self.messages.popleft(), ensure_ascii=False))
                frame, self.frame = self.frame, None
                if frame is not None and not self.socket.closed:
                    await self.socket.send_bytes(frame)
        except (ConnectionError, RuntimeError):      # the page went away mid-send: it reconnects
            pass


class WebConsole:
    """The console for one backend, listening on ``host``:``port`` (0: a free port) once started."""

    def __init__(self, backend, host: str = "127.0.0.1", port: int = 0, token: str = "", log=None):
        self.backend = backend
        self.host, self.port, self.token = host, int(port), token or ""
        self.log = log
        self.live = LiveView()
        self.pages: set[_Page] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._calls = ThreadPoolExecutor(max_workers=REQUEST_THREADS, thread_name_prefix="web-request")
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-jpeg")
        self._frame_ready: asyncio.Event | None = None
        self._tasks: list = []
        self._cookie = f"personal_vlm_token_{self.port}"

    # ---- lifetime, from the node's threads -----------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Listen; PersonalVLMError when the address cannot be had (in use, not this machine's)."""
        started = threading.Event()
        failure: list = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except OSError as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="web-console", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise PersonalVLMError(f"the web console did not start listening on {self.host}:{self.port} within "
                                   f"{START_TIMEOUT_S:g} s")
        if failure:
            exc = failure[0]
            raise PersonalVLMError(f"the web console cannot listen on {self.host}:{self.port}: "
                                   f"{exc.strerror or exc}; choose another web_port / web_host")

    def stop(self) -> None:
        """Close every page's websocket and stop listening."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(STOP_TIMEOUT_S)
        except Exception as exc:       # noqa: BLE001 - shutting down: say it and go on
            self._say("warning", f"web console: closing took too long ({type(exc).__name__})")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def offer_frame(self, array, detections, received: float) -> None:
        """From the frame worker: a processed frame; nearly free while no page watches."""
        self.live.offer(array, detections, received)

    def concepts_changed(self) -> None:
        """From any thread: a concept was taught or forgotten; every page reloads its library."""
        self._broadcast({"type": "concepts"})

    # ---- the event loop's side -----------------------------------------------------------------
    def _say(self, level: str, message: str) -> None:
        if self.log is not None:
            getattr(self.log, level)(message)

    def _broadcast(self, message: dict) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(lambda: [page.post(message) for page in list(self.pages)])

    async def _open(self) -> None:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._guard])
        for path in PAGE_FILES:
            app.router.add_get(path, self._page_file)
        app.router.add_get("/api/concepts", self._concepts)
        app.router.add_get("/api/picture", self._picture)
        app.router.add_get("/api/health", self._health)
        app.router.add_post("/api/teach", self._teach)
        app.router.add_post("/api/forget", self._forget)
        app.router.add_get("/ws", self._socket)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = site._server.sockets[0].getsockname()[1]
        self._cookie = f"personal_vlm_token_{self.port}"
        self._frame_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.live.wake = lambda: loop.call_soon_threadsafe(self._frame_ready.set)
        self._tasks = [asyncio.create_task(self._send_frames()), asyncio.create_task(self._send_health())]

    async def _close(self) -> None:
        self.live.wake = lambda: None
        for task in self._tasks:
            task.cancel()
        for page in list(self.pages):
            page.stop_asking = True
            await page.socket.close(code=1001, message=b"the node is shutting down")
        if self._runner is not None:
            await self._runner.cleanup()

    async def _call(self, function, *args):
        """``function(*args)`` on a request thread (it may wait in a line behind other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._calls, function, *args)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        from_query = False
        if self.token:
            given = request.cookies.get(self._cookie, "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[len("Bearer "):]
            elif "token" in request.query:
                given, from_query = request.query["token"], True
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.Response(status=401, text="401: unauthorized\n")
        if is_loopback(self.host) and not is_loopback(urlsplit(f"//{request.host}").hostname or ""):
            # Listening on this machine only, a request naming another host is a page of another site
            # whose name was pointed at 127.0.0.1 (DNS rebinding).
            return web.Response(status=403, text="403: this console answers to 127.0.0.1 / localhost only\n")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="403: requests from another site's page are refused\n")
        if request.method == "POST" and request.content_type != "application/json":
            return self._json({"success": False, "message": "send the request as application/json"}, 415)
        try:
            response = await handler(request)
        except RequestError as exc:
            response = self._json({"success": False, "message": str(exc)}, 400)
        if response.prepared:         # a websocket, answered already
            return response
        response.headers.update(SECURITY_HEADERS)
        if from_query:
            # The page's own files and pictures are then fetched with the cookie (never sent by another
            # site's page: SameSite=Strict).
            response.set_cookie(self._cookie, self.token, httponly=True, samesite="Strict", path="/")
        return response

    @staticmethod
    def _json(payload, status: int = 200) -> web.Response:
        return web.Response(status=status, text=json.dumps(payload, ensure_ascii=False),
                            content_type="application/json")

    @staticmethod
    async def _body(request: web.Request) -> dict:
        try:
            body = json.loads(await request.read())   # over MAX_REQUEST_BYTES: aiohttp answers 413
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the request is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the request must be a JSON object")
        return body

    async def _page_file(self, request: web.Request) -> web.Response:
        name, kind = PAGE_FILES[request.path]
        data = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=data, content_type=kind, charset="utf-8")

    async def _concepts(self, request: web.Request) -> web.Response:
        try:
            rows = await self._call(self.backend.concepts, dict(self.live.last_source))
        except PersonalVLMError as exc:
            return self._json({"success": False, "message": str(exc)}, 500)
        return self._json({"success": True, "concepts": rows})

    async def _picture(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        try:
            index = int(request.query.get("index", "0"))
        except ValueError:
            raise RequestError("index must be a whole number") from None
        try:
            pictures = await self._call(self.backend.pictures, name)
        except PersonalVLMError as exc:
            return self._json({"success": False, "message": str(exc)}, 404)
        if not 0 <= index < len(pictures):
            return self._json({"success": False, "message": f"{name!r} has {len(pictures)} reference pictures"}, 404)
        encoded = io.BytesIO()
        pictures[index].convert("RGB").save(encoded, format="PNG")
        return web.Response(body=encoded.getvalue(), content_type="image/png")

    async def _health(self, request: web.Request) -> web.Response:
        return self._json(self.backend.health())

    async def _teach(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name, category, add = _text(body, "name"), _text(body, "category"), _flag(body, "add")
        box = parse_box(body.get("box"))
        frame = self.live.frame(body.get("frame"))     # None: the node's latest camera frame
        reply = await self._call(self.backend.teach, name, category, box, add, frame)
        return self._json(reply)

    async def _forget(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        reply = await self._call(self.backend.forget, _text(body, "name"))
        if reply.get("success"):
            self.live.forget_concept(reply.get("name", ""))
        return self._json(reply)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=MAX_SOCKET_MESSAGE_BYTES, heartbeat=10.0)
        await socket.prepare(request)
        page = _Page(socket)
        self.pages.add(page)
        self.live.watchers += 1
        sender = asyncio.create_task(page.send_all())
        page.post({"type": "health", **self.backend.health()})
        try:
            async for message in socket:
                if message.type == WSMsgType.TEXT:
                    self._on_message(page, message.data)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            self.pages.discard(page)
            self.live.watchers -= 1
            page.stop_asking = True
            if page.held is not None:
                self.live.unpin(page.held)
            page.ready.set()
            sender.cancel()
        return socket

    def _on_message(self, page: _Page, data: str) -> None:
        try:
            message = json.loads(data)
            kind = message.get("type") if isinstance(message, dict) else None
        except json.JSONDecodeError:
            kind = None
        if kind == "ask":
            question = message.get("question")
            if page.asking:
                page.post({"type": "error", "message": "an answer is still coming; stop it first"})
            elif not isinstance(question, str):
                page.post({"type": "error", "message": "question must be text"})
            else:
                asyncio.create_task(self._ask(page, question))
        elif kind == "stop":
            page.stop_asking = True
        elif kind == "hold":
            if page.held is not None:
                self.live.unpin(page.held)
            page.held = message.get("frame") if self.live.pin(message.get("frame")) else None
        elif kind == "release":
            if page.held is not None:
                self.live.unpin(page.held)
            page.held = None
        else:
            page.post({"type": "error", "message": "unknown message; the page sends ask, stop, hold or release"})

    async def _ask(self, page: _Page, question: str) -> None:
        page.asking, page.stop_asking = True, False
        loop = asyncio.get_running_loop()

        def partial(text: str) -> bool:
            if page.stop_asking or page.socket.closed:
                return False
            loop.call_soon_threadsafe(page.post, {"type": "answer", "text": text, "done": False})
            return True

        try:
            reply = await self._call(self.backend.ask, question, partial)
        except Exception as exc:      # noqa: BLE001 - the backend answers errors itself; a bug still gets a line
            reply = {"success": False, "message": f"internal error: {type(exc).__name__}: {exc}", "answer": ""}
        finally:
            page.asking = False
        page.post({"type": "answer", "done": True, "stopped": page.stop_asking and reply.get("success", False),
                   **reply})

    async def _send_frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            frame = self.live.take()
            if frame is None or not self.pages:
                continue
            try:
                data = await loop.run_in_executor(self._encoder, packed_frame, *frame)
            except (OSError, ValueError) as exc:        # a frame Pillow cannot encode: skip it
                self._say("warning", f"web console: frame not sent: {exc}")
                continue
            for page in list(self.pages):
                page.post_frame(data)

    async def _send_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            if self.pages:
                message = {"type": "health", **self.backend.health()}
                for page in list(self.pages):
                    page.post(message)
