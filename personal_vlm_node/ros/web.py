"""The node's web console (parameter ``web_port``): :class:`personal_vlm_node.web.server.WebConsole`
over this node's own pieces.

Teach, forget and ask from the page are the services' requests (:class:`.services.Services`): the
same checks and messages (names, regions of interest), the same lines (one teach at a time, so of
two pages teaching one name, one wins and the other hears "already taught"), the same "busy". The
library and the health panel read the Assistant and the diagnostics that ``/diagnostics`` sends.
"""

from __future__ import annotations

from ..errors import PersonalVLMError

LEVELS = {0: "OK", 1: "WARN", 2: "ERROR"}


class NodeConsoleBackend:
    """What the console asks of the node, each a plain-Python call that answers a dict."""

    def __init__(self, assistant, values: dict, services, diagnostics):
        self.assistant = assistant
        self.values = values
        self.services = services
        self.diagnostics = diagnostics
        self._picture_counts: dict[tuple[str, float], int] = {}

    def teach(self, name: str, category: str, box, add: bool, frame) -> dict:
        """Teach ``name`` from ``frame`` (the page's; None: the latest camera frame) inside ``box``."""
        from personal_vlm_interfaces.srv import TeachConcept
        from sensor_msgs.msg import RegionOfInterest

        from .convert import array_to_image_msg

        roi = RegionOfInterest()
        if box is not None:
            roi = RegionOfInterest(x_offset=box[0], y_offset=box[1], width=box[2], height=box[3])
        images = [] if frame is None else [array_to_image_msg(frame)]
        response = self.services.teach(TeachConcept.Request(name=name, category=category, images=images, roi=roi,
                                                            add=add))
        return {"success": bool(response.success), "message": response.message,
                "memory_tokens": int(response.memory_tokens), "keywords": list(response.keywords)}

    def forget(self, name: str) -> dict:
        from personal_vlm_interfaces.srv import ForgetConcept

        response = self.services.forget(ForgetConcept.Request(name=name))
        return {"success": bool(response.success), "message": response.message, "name": name}

    def ask(self, question: str, on_partial) -> dict:
        response = self.services.ask_streaming(question, on_partial)
        return {"success": bool(response.success), "message": response.message, "answer": response.answer,
                "concepts": list(response.concepts)}

    def concepts(self, deciding: dict[str, str]) -> list[dict]:
        """Every concept as the library shows it; ``deciding``: the stage (match, ego, r2p) that
        decided each one's latest detection on the live view."""
        assistant = self.assistant
        damaged, unmatched = assistant.damaged, assistant.unmatched
        own = assistant.concept_accepts()
        rows = []
        for record in assistant.concepts():
            if record.name in damaged:
                state = f"damaged, not recognised: {damaged[record.name]}"
            elif record.name in unmatched:
                state = "no memory for this model yet: not recognised"
            else:
                state = "recognised"
            rows.append({"name": record.name, "category": record.category, "keywords": list(record.keywords),
                         "memory_tokens": int(record.memory_tokens), "pictures": self._pictures_of(record),
                         "state": state, "decided_by": deciding.get(record.name, ""),
                         "accept": round(own.get(record.name, assistant.thresholds()[0]), 4),
                         "fingerprint": "complete" if record.fingerprint_complete else "pending",
                         "rois": [r if isinstance(r, list) else None for r in record.extra.get("rois") or []]})
        return rows

    def _pictures_of(self, record) -> int:
        key = (record.name, record.updated)
        if key not in self._picture_counts:
            try:
                self._picture_counts[key] = len(self.assistant.store.load_images(record.name))
            except PersonalVLMError:
                return 0
        return self._picture_counts[key]

    def pictures(self, name: str) -> list:
        """The concept's reference pictures, as the store keeps them (it checks the name)."""
        return self.assistant.store.load_images(name)

    def health(self) -> dict:
        """The frame path's health as /diagnostics last said it, and the verification budget."""
        status = self.diagnostics.latest
        budget = {"verifications_per_second": float(self.values["verifications_per_second"]),
                  "verification_busy_fraction": float(self.values["verification_busy_fraction"]),
                  "verification": bool(self.assistant.verification)}
        if status is None:
            return {"level": "WARN", "message": "no diagnostics yet", "values": {}, **budget}
        level = status.level[0] if isinstance(status.level, (bytes, bytearray)) else int(status.level)
        return {"level": LEVELS.get(level, str(level)), "message": status.message,
                "values": {kv.key: kv.value for kv in status.values}, **budget}


def exposure_warning(host: str, token: str, is_loopback) -> str | None:
    """What to warn of when the console listens on ``host``: None on a loopback address."""
    if is_loopback(host):
        return None
    return (f"the web console listens on {host}, open to the network: anyone who reaches it "
            + ("with the token " if token else "") + "can see the camera, teach and forget"
            + ("" if token else "; set web_token"))


def start_web_console(node, assistant, values: dict, frame_path, services, diagnostics):
    """The console on ``web_host``:``web_port``, listening; a warning when it is open to the network."""
    try:
        from ..web.server import WebConsole, is_loopback
    except ImportError as exc:
        raise PersonalVLMError(f"the web console needs aiohttp ({exc}): pip install -r requirements.txt, "
                               "or set web_port to 0") from exc

    log = node.get_logger()
    host, token = str(values["web_host"]), str(values["web_token"])
    console = WebConsole(NodeConsoleBackend(assistant, values, services, diagnostics), host=host,
                         port=int(values["web_port"]), token=token, log=log)
    console.start()
    frame_path.listeners.append(console.offer_frame)
    assistant.bank_listeners.append(console.concepts_changed)
    warning = exposure_warning(host, token, is_loopback)
    if warning:
        log.warning(warning)
    log.info(f"web console on {console.url}" + (" (token required)" if token else ""))
    return console


def stop_web_console(console, assistant, frame_path) -> None:
    if console.offer_frame in frame_path.listeners:
        frame_path.listeners.remove(console.offer_frame)
    if console.concepts_changed in assistant.bank_listeners:
        assistant.bank_listeners.remove(console.concepts_changed)
    console.stop()
