"""The web console over plain HTTP and its websocket (aiohttp's client), against a running node.

One node process (tiny random-weight Qwen2.5-VL, its own namespace, console on a free port with a
token) serves the module; a test camera publishes one noise picture ten times a second. The
console's answers are compared with the services' own for the same bad input.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct

import pytest

pytest.importorskip("rclpy")
aiohttp = pytest.importorskip("aiohttp")

from personal_vlm_interfaces.srv import TeachConcept  # noqa: E402
from sensor_msgs.msg import RegionOfInterest  # noqa: E402

from personal_vlm_node.ros.client import NodeClient  # noqa: E402
from personal_vlm_node.testing.console import TestCamera, start_console_node  # noqa: E402
from personal_vlm_node.web.server import MAX_REQUEST_BYTES, MAX_SOCKET_MESSAGE_BYTES, is_loopback, parse_box  # noqa: E402

NAMESPACE = f"/web_test_{os.getpid()}"
TOKEN = "a-long-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 120.0


# ---- without a node ---------------------------------------------------------------------------

def test_only_loopback_addresses_count_as_this_machine_only():
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.3.4.5")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.20", "::", "robot.local")] == [False] * 4


def test_listening_beyond_this_machine_is_warned_of_and_more_so_without_a_token():
    from personal_vlm_node.ros.web import exposure_warning

    assert exposure_warning("127.0.0.1", "", is_loopback) is None
    assert exposure_warning("0.0.0.0", "", is_loopback) == (
        "the web console listens on 0.0.0.0, open to the network: anyone who reaches it can see the camera, "
        "teach and forget; set web_token")
    assert "anyone who reaches it with the token can" in exposure_warning("192.168.1.20", "t", is_loopback)


@pytest.mark.parametrize("box, problem", [
    ([1, 2, 3], "four numbers"), ("1,2,3,4", "four numbers"), ([1, 2, 3, -4], "pixels in"),
    ([1, 2, True, 4], "pixels in"), ([1, 2, float("nan"), 4], "pixels in"), ([0, 0, 10**9, 1], "pixels in"),
])
def test_a_box_that_is_not_four_pixel_counts_is_refused_before_the_node_sees_it(box, problem):
    from personal_vlm_node.web.server import RequestError

    with pytest.raises(RequestError, match=problem):
        parse_box(box)


def test_a_box_is_rounded_to_whole_pixels_and_none_means_no_box():
    assert parse_box([10.4, 20.6, 30, 40]) == (10, 21, 30, 40)
    assert parse_box(None) is None


# ---- the node with its console ------------------------------------------------------------------

@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_checkpoints):
    folder = tmp_path_factory.mktemp("web")
    model = tiny_checkpoints["qwen2_5_vl"]
    proc, url = start_console_node(folder, str(model), NAMESPACE, token=TOKEN)
    client = NodeClient(NAMESPACE, timeout=WAIT_S, client_name="web_test_client")
    camera = TestCamera(client, seed=1)
    yield {"url": url.rstrip("/"), "client": client, "proc": proc, "log": folder / "node.log"}
    camera.stop()
    client.close()
    proc.terminate()
    proc.wait(30)


def run(coroutine):
    return asyncio.run(coroutine)


async def fetch(url: str, method: str = "GET", headers=None, **kwargs):
    """(status, body text, headers) of one request."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, **kwargs) as response:
            return response.status, await response.text(), response.headers


async def post(url: str, body, headers=AUTH):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, await response.json()


async def latest_frame_ready(console):
    """Wait until the node has a camera frame (the first health reports one)."""
    for _ in range(int(WAIT_S * 2)):
        status, text, _ = await fetch(console["url"] + "/api/health", headers=AUTH)
        if status == 200 and int(json.loads(text)["values"].get("processed_frames", "0")) > 0:
            return
        await asyncio.sleep(0.5)
    raise AssertionError("the node processed no camera frame")


@pytest.mark.parametrize("path", ["/", "/console.js", "/api/concepts", "/api/health", "/api/picture?name=x",
                                  "/ws", "/no/such/page", "/../setup.py"])
@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}],
                         ids=["missing", "wrong", "not-bearer"])
def test_without_the_right_token_every_request_gets_401_and_nothing_else(console, path, headers):
    status, text, _ = run(fetch(console["url"] + path, headers=headers))
    assert (status, text) == (401, "401: unauthorized\n")


def test_a_wrong_token_in_the_query_gets_401_for_posts_and_the_websocket_too(console):
    status, text, _ = run(fetch(console["url"] + "/api/forget?token=wrong", "POST", json={"name": "x"}))
    assert (status, text) == (401, "401: unauthorized\n")

    async def socket():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(console["url"] + "/ws?token=wrong")
            return refused.value.status
    assert run(socket()) == 401


def test_with_the_token_the_page_and_its_files_are_served_and_nothing_else(console):
    status, text, headers = run(fetch(console["url"] + f"/?token={TOKEN}"))
    assert status == 200 and "<canvas id=\"view\"" in text and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    status, text, _ = run(fetch(console["url"] + "/console.js", headers=AUTH))
    assert status == 200 and "new WebSocket" in text
    for path in ("/static/index.html", "/../setup.py", "/%2e%2e/setup.py", "/console.js/../../setup.py",
                 "/index.html"):
        status, _, _ = run(fetch(console["url"] + path, headers=AUTH))
        assert status == 404, path


def test_a_page_opened_with_the_token_gets_a_strict_cookie_for_its_own_files(console):
    async def scenario():
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(console["url"] + f"/?token={TOKEN}") as answer:
                set_cookie = answer.headers["Set-Cookie"]
            async with session.get(console["url"] + "/console.css") as answer:
                return set_cookie, answer.status
    set_cookie, status = run(scenario())
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and status == 200


def _service_teach(client, name: str, roi=(0, 0, 0, 0)):
    x, y, w, h = roi
    request = TeachConcept.Request(name=name, roi=RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h))
    return client.send(TeachConcept, "teach_concept", request).message


@pytest.mark.parametrize("name, box", [
    ("", None), ("   ", None), ("a/b", [10, 10, 20, 20]), ("x" * 300, None), ("my\nmug", None),
    ("my mug", [10, 10, 0, 20]),            # an empty box
    ("my mug", [250, 150, 100, 100]),       # reaching outside the 300×200 frame
    ("my mug", [400, 300, 10, 10]),         # wholly outside it
])
def test_bad_names_and_boxes_get_the_services_own_messages(console, name, box):
    run(latest_frame_ready(console))
    status, reply = run(post(console["url"] + "/api/teach", {"name": name, "box": box}))
    expected = _service_teach(console["client"], name, tuple(box) if box else (0, 0, 0, 0))
    assert status == 200 and reply["success"] is False
    assert reply["message"] == expected and "\n" not in expected


@pytest.mark.parametrize("body, problem", [
    ({"name": 5}, "name must be text"), ({"name": "a", "add": "yes"}, "add must be true or false"),
    ({"name": "a", "box": [1, 2]}, "four numbers"), ([1, 2], "JSON object"),
])
def test_malformed_requests_get_400_with_one_line(console, body, problem):
    status, reply = run(post(console["url"] + "/api/teach", body))
    assert status == 400 and reply["success"] is False and problem in reply["message"]


def test_requests_that_are_not_json_or_too_big_or_from_another_site_are_refused(console):
    url = console["url"] + "/api/teach"
    status, text, _ = run(fetch(url, "POST", headers={**AUTH, "Content-Type": "text/plain"}, data="name=x"))
    assert status == 415 and "application/json" in text
    status, text, _ = run(fetch(url, "POST", headers={**AUTH, "Content-Type": "application/json"}, data="{nope"))
    assert status == 400 and "not valid JSON" in text
    big = json.dumps({"name": "x" * (MAX_REQUEST_BYTES + 10)})
    status, _, _ = run(fetch(url, "POST", headers={**AUTH, "Content-Type": "application/json"}, data=big))
    assert status == 413
    status, text, _ = run(fetch(url, "POST", headers={**AUTH, "Origin": "http://evil.example"}, json={"name": "x"}))
    assert status == 403
    port = console["url"].rsplit(":", 1)[1]
    status, text, _ = run(fetch(console["url"] + "/api/concepts", headers={**AUTH, "Host": f"evil.example:{port}"}))
    assert status == 403 and "localhost only" in text                  # a rebound name, on a loopback console
    status, _, _ = run(fetch(console["url"] + "/api/concepts", headers={**AUTH, "Host": f"localhost:{port}"}))
    assert status == 200


def test_a_websocket_message_over_the_limit_closes_that_socket_only(console):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            socket = await session.ws_connect(console["url"] + f"/ws?token={TOKEN}")
            await socket.send_str("x" * (MAX_SOCKET_MESSAGE_BYTES + 1))
            while (message := await socket.receive(timeout=30)).type not in (
                    aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                pass
            return socket.close_code
    assert run(scenario()) == 1009                    # "message too big"
    status, _, _ = run(fetch(console["url"] + "/api/health", headers=AUTH))
    assert status == 200


def test_two_pages_teaching_one_name_at_once_one_wins_and_the_other_hears_already_exists(console):
    run(latest_frame_ready(console))

    async def both():
        body = {"name": "twin", "box": [20, 20, 60, 60]}
        return await asyncio.gather(post(console["url"] + "/api/teach", body),
                                    post(console["url"] + "/api/teach", body))
    replies = [reply for _, reply in run(both())]
    assert sorted(r["success"] for r in replies) == [False, True]
    loser = next(r for r in replies if not r["success"])
    assert loser["message"].startswith("a concept named 'twin' already exists")
    status, reply = run(post(console["url"] + "/api/forget", {"name": "twin"}))
    assert reply == {"success": True, "message": "forgot 'twin'", "name": "twin"}


async def frames_until(socket, condition, timeout: float):
    """The first frame header from ``socket`` for which ``condition(header)`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        message = await socket.receive(timeout=deadline - loop.time())
        if message.type == aiohttp.WSMsgType.BINARY:
            length = struct.unpack(">I", message.data[:4])[0]
            header = json.loads(message.data[4:4 + length])
            assert message.data[4 + length:4 + length + 2] == b"\xff\xd8"       # a JPEG follows
            if condition(header):
                return header
    raise AssertionError("no such frame came")


def test_a_concept_taught_from_the_page_shows_in_the_live_view_and_the_library_then_goes(console):
    url = console["url"]

    async def scenario():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            socket = await session.ws_connect(url + "/ws")
            first = await frames_until(socket, lambda h: True, WAIT_S)
            assert (first["width"], first["height"]) == (300, 200)
            await socket.send_json({"type": "hold", "frame": first["seq"]})
            status, reply = await post(url + "/api/teach", {"name": "my mug", "category": "mug",
                                                            "box": [100, 50, 80, 60], "frame": first["seq"]})
            assert reply["success"], reply
            assert reply["message"].startswith("taught 'my mug' from 1 image(s)")    # the page's frame
            seen = await frames_until(socket, lambda h: any(d["name"] == "my mug" for d in h["detections"]), WAIT_S)
            detection = next(d for d in seen["detections"] if d["name"] == "my mug")
            assert detection["source"] == "match" and detection["score"] >= 0.999 and detection["track_id"] > 0
            async with session.get(url + "/api/concepts") as answer:
                concepts = (await answer.json())["concepts"]
            async with session.get(url + "/api/picture", params={"name": "my mug", "index": "0"}) as answer:
                picture = (answer.status, answer.content_type, (await answer.read())[:8])
            async with session.get(url + "/api/picture", params={"name": "../../etc/passwd"}) as answer:
                hostile = answer.status, (await answer.json())["message"]
            status, forgot = await post(url + "/api/forget", {"name": "my mug"})
            gone = await frames_until(socket, lambda h: not h["detections"], WAIT_S)
            await socket.close()
            return concepts, picture, hostile, forgot, gone
    concepts, picture, hostile, forgot, gone = run(scenario())
    row = next(c for c in concepts if c["name"] == "my mug")
    assert (row["category"], row["pictures"], row["state"], row["rois"]) == ("mug", 1, "recognised",
                                                                              [[100.0, 50.0, 80.0, 60.0]])
    assert row["memory_tokens"] > 0 and row["decided_by"] == "match"
    assert picture == (200, "image/png", b"\x89PNG\r\n\x1a\n")
    assert hostile[0] == 404 and "/" in hostile[1]
    assert forgot["success"] and gone["detections"] == []


def test_an_answer_streams_over_the_websocket_and_stop_ends_it(console):
    run(latest_frame_ready(console))

    async def ask(stop: bool):
        async with aiohttp.ClientSession(headers=AUTH) as session:
            socket = await session.ws_connect(console["url"] + "/ws")
            await socket.send_json({"type": "ask", "question": "What do you see?"})
            partials = []
            while True:
                message = await socket.receive(timeout=WAIT_S)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if data["type"] != "answer":
                    continue
                if data["done"]:
                    await socket.close()
                    return partials, data
                partials.append(data["text"])
                if stop and len(partials) == 1:
                    await socket.send_json({"type": "stop"})
    partials, done = run(ask(stop=False))
    assert done["success"] and len(partials) >= 2 and done["answer"].startswith(partials[-1].rstrip("\ufffd"))
    stopped_partials, stopped = run(ask(stop=True))
    assert stopped["success"] and stopped["stopped"] is True
    assert len(stopped_partials) < len(partials)
    status, reply = run(post(console["url"] + "/api/teach", {"name": "after asking", "box": [10, 10, 30, 30]}))
    assert reply["success"], reply                       # the node goes on serving


def test_a_question_that_is_empty_gets_the_services_message(console):
    async def ask():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            socket = await session.ws_connect(console["url"] + "/ws")
            await socket.send_json({"type": "ask", "question": "  "})
            while True:
                message = await socket.receive(timeout=WAIT_S)
                data = json.loads(message.data) if message.type == aiohttp.WSMsgType.TEXT else {}
                if data.get("type") == "answer" and data["done"]:
                    return data
    reply = run(ask())
    assert reply["success"] is False and reply["message"] == "the question is empty"


def test_the_health_message_is_what_diagnostics_computes(console):
    status, text, _ = run(fetch(console["url"] + "/api/health", headers=AUTH))
    health = json.loads(text)
    assert health["level"] in ("OK", "WARN", "ERROR")
    for key in ("received_hz", "processed_hz", "latency_ms", "dropped_frames", "unverified_matches"):
        assert key in health["values"]
    assert health["verifications_per_second"] == 2.0 and health["verification"] is False


def test_a_websocket_message_the_page_would_never_send_gets_one_line_and_the_socket_stays(console):
    async def scenario():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            socket = await session.ws_connect(console["url"] + "/ws")
            replies = []
            for message in ("not json", json.dumps({"type": "teach"}), json.dumps([1, 2]),
                            json.dumps({"type": "ask", "question": 42}),
                            json.dumps({"type": "hold", "frame": "../etc"}), json.dumps({"type": "release"})):
                await socket.send_str(message)
            while len(replies) < 4:
                message = await socket.receive(timeout=WAIT_S)
                if message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "error":
                    replies.append(json.loads(message.data)["message"])
            await frames_until(socket, lambda h: True, WAIT_S)          # still served frames
            await socket.close()
            return replies
    replies = run(scenario())
    assert replies[:3] == ["unknown message; the page sends ask, stop, hold or release"] * 3
    assert replies[3] == "question must be text"
