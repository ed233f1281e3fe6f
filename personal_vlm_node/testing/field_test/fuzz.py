"""Scenario 3, fuzz: malformed and valid requests and camera frames; every one answered, the node never dies."""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from ..kit import HEIGHT, WIDTH, image_msg, pixels
from .client import FieldClient, teach_request
from .world import MAX_FUZZ_LOG_BYTES, MAX_REPLY_CHARS, REQUEST_TIMEOUT_S, NodeRun, Report, World, say


# ---- scenario 3: fuzz ------------------------------------------------------------------------

def _raw_image(width, height, encoding="rgb8", step=None, data=b"", bigendian=0):
    from sensor_msgs.msg import Image

    return Image(width=width, height=height, encoding=encoding, step=width * 3 if step is None else step,
                 data=data, is_bigendian=bigendian)


def bad_images(rng: random.Random):
    """Malformed sensor_msgs/Image messages, each with what is wrong with it."""
    good = pixels(rng.randint(0, 10_000))
    data = good.tobytes()
    return [
        ("unknown encoding", _raw_image(WIDTH, HEIGHT, "yuv422_what", data=data)),
        ("5000-character encoding", _raw_image(WIDTH, HEIGHT, "x" * 5000, data=data)),
        ("empty encoding", _raw_image(WIDTH, HEIGHT, "", data=data)),
        ("step too small", _raw_image(WIDTH, HEIGHT, step=WIDTH, data=data)),
        ("data truncated", _raw_image(WIDTH, HEIGHT, data=data[: len(data) // 2])),
        ("no data", _raw_image(WIDTH, HEIGHT, data=b"")),
        ("zero width", _raw_image(0, HEIGHT, data=data)),
        ("zero height", _raw_image(WIDTH, 0, data=data)),
        ("huge size claimed", _raw_image(1_000_000, 1_000_000, data=data[:1000])),
        ("huge step claimed", _raw_image(WIDTH, HEIGHT, step=2**32 - 1, data=data)),
        ("mono16 odd bytes", _raw_image(WIDTH, HEIGHT, "mono16", step=WIDTH * 2, data=data[: WIDTH * HEIGHT * 2 - 1])),
    ]


def odd_images(rng: random.Random):
    """Well-formed images in unusual encodings: each must be accepted."""
    good = pixels(rng.randint(0, 10_000))
    padded = np.zeros((HEIGHT, WIDTH * 4 + 16), dtype=np.uint8)
    padded[:, : WIDTH * 4] = np.concatenate([good, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=2).reshape(HEIGHT, -1)
    nan = np.full((HEIGHT, WIDTH), np.nan, dtype="<f4")
    nan[10:20, 10:20] = np.inf
    nan[50:60, 50:60] = 1.0
    return [
        ("rgb8", image_msg(good)),
        ("bgr8", _raw_image(WIDTH, HEIGHT, "bgr8", data=good[:, :, ::-1].tobytes())),
        ("rgba8 with row padding", _raw_image(WIDTH, HEIGHT, "rgba8", step=WIDTH * 4 + 16, data=padded.tobytes())),
        ("mono8", _raw_image(WIDTH, HEIGHT, "mono8", step=WIDTH, data=good[:, :, 0].tobytes())),
        ("mono16 big-endian", _raw_image(WIDTH, HEIGHT, "mono16", step=WIDTH * 2,
                                         data=good[:, :, :2].astype(">u2").tobytes()[: WIDTH * HEIGHT * 2], bigendian=1)),
        ("32FC1 with NaN and inf", _raw_image(WIDTH, HEIGHT, "32FC1", step=WIDTH * 4, data=nan.tobytes())),
    ]


BAD_NAMES = ["", "   ", "a/b", "..", "x" * 5000, "\u200d\u200d\u200b", "my \x1b[31mmug", "tab\tname",
             "\x00zero", "\ud7ff\ufeff", "y" * 5000 + "\x07"]
ODD_NAMES = ["ネコ 🐈‍⬛", "café", "Grandpa's cane", "מִשְׁקָפַיִם", "🫨 shaking", "e\u0301clair", "Ω≈ç√∫",
             "👩🏽‍🚀 astronaut", "空", "x" * 55]   # a numeric suffix follows: 64 characters at most


def fuzz_cases(rng: random.Random, count: int):
    """(service, request, expectation, what) for ``count`` requests: "fail" (success=false and a
    short message), "ok" or "any". Forgets of names taught here are added by the sender."""
    from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts
    from sensor_msgs.msg import Image, RegionOfInterest

    good = pixels(rng.randint(0, 10_000))
    for i in range(count):
        roll = rng.random()
        if roll < 0.30:
            what, image = rng.choice(bad_images(rng))
            yield "teach_concept", _with_images(f"fuzz {i}", [image]), "fail", f"teach with a bad image ({what})"
        elif roll < 0.40:
            name = rng.choice(BAD_NAMES)
            yield "teach_concept", teach_request(name, [good]), "fail", f"teach named {name[:20]!r}"
        elif roll < 0.48:
            roi = rng.choice([RegionOfInterest(x_offset=WIDTH, y_offset=0, width=10, height=10),
                              RegionOfInterest(x_offset=5, y_offset=5, width=0, height=10),
                              RegionOfInterest(x_offset=0, y_offset=0, width=2**32 - 1, height=2**32 - 1),
                              RegionOfInterest(x_offset=2**32 - 1, y_offset=2**32 - 1, width=1, height=1)])
            yield "teach_concept", teach_request(f"fuzz roi {i}", [good], roi=roi), "fail", "teach with a bad ROI"
        elif roll < 0.52:
            category = rng.choice(["\x1b[2J\x1b[31mred", "c" * 5000, "bell\x07", "new\nline"])
            yield "teach_concept", teach_request(f"fuzz cat {i}", [good], category=category), "fail", \
                "teach with a bad category"
        elif roll < 0.53:
            yield "teach_concept", teach_request(f"fuzz many {i}", [good] * 9), "fail", "teach with 9 pictures"
        elif roll < 0.545:
            what, image = rng.choice(odd_images(rng))
            name = f"{rng.choice(ODD_NAMES)} {i}"
            yield "teach_concept", _with_images(name, [image]), "ok", f"teach {name!r} from {what}"
        elif roll < 0.65:
            question = rng.choice(["", "   ", "q" * 1001, "w" * 100_000, "\x1b[31m?" * 400])
            yield "ask", Ask.Request(question=question, image=image_msg(good)), "fail", \
                f"ask {question[:10]!r} ({len(question)} characters)"
        elif roll < 0.72:
            what, image = rng.choice(bad_images(rng))
            yield "ask", Ask.Request(question="where is my mug?", image=image), "fail", f"ask on a bad image ({what})"
        elif roll < 0.725:
            yield "ask", Ask.Request(question="what is this?", image=image_msg(good)), "ok", "ask"
        elif roll < 0.73:
            yield "ask", Ask.Request(question="what is this?", image=Image()), "any", "ask on the latest frame"
        elif roll < 0.85:
            yield "list_concepts", ListConcepts.Request(), "ok", "list"
        else:
            name = rng.choice(BAD_NAMES + [f"never taught {i}", "ネコ"])
            yield "forget_concept", ForgetConcept.Request(name=name), "fail", f"forget {name[:20]!r}"


def _with_images(name: str, images: list):
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept.Request(name=name, images=images)


def bad_frames(rng: random.Random):
    frames = bad_images(rng)
    return [(what, image) for what, image in frames] + [("a good frame", image_msg(pixels(rng.randint(0, 99))))]


def fuzz(report: Report, world: World, node: NodeRun, client: FieldClient, requests: int, frames: int) -> None:
    from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept

    types = {"teach_concept": TeachConcept, "ask": Ask, "list_concepts": ListConcepts,
             "forget_concept": ForgetConcept}
    figures = report.scenario("fuzz")
    rng = random.Random(world.seed * 7 + 4)
    say(f"scenario 3: {requests} fuzzed service requests and {frames} camera frames")
    log_before = node.log_bytes()
    tracebacks_before = node.tracebacks()
    window = threading.BoundedSemaphore(8)
    lock = threading.Lock()
    results = []                          # (expectation, what, service, response or None)
    taught: list[str] = []
    frame_menu = bad_frames(rng) + [("an odd frame " + w, m) for w, m in odd_images(rng)]
    sent = frames_sent = malformed_frames = 0
    pending: list = []

    def send(service, request, expect, what):
        window.acquire()
        future = client.call_async(types[service], service, request)
        entry = [expect, what, service, None, request.name if service == "teach_concept" else None]

        def answered(f):
            entry[3] = f.result()
            with lock:
                results.append(entry)
                if entry[2] == "teach_concept" and entry[0] == "ok" and entry[3] is not None and entry[3].success:
                    taught.append(entry[4])
            window.release()

        future.add_done_callback(answered)
        pending.append((future, entry))

    frames_per_request = frames / max(1, requests)
    frame_credit = 0.0
    t0 = time.monotonic()
    for service, request, expect, what in fuzz_cases(rng, requests):
        send(service, request, expect, what)
        sent += 1
        with lock:
            name = taught.pop() if taught and rng.random() < 0.5 else None
        if name is not None:
            send("forget_concept", ForgetConcept.Request(name=name), "ok", f"forget {name!r}")
            sent += 1
        frame_credit += frames_per_request
        while frame_credit >= 1.0:
            frame_credit -= 1.0
            what_frame, msg = rng.choice(frame_menu)
            client.publish_frame(msg)
            frames_sent += 1
            malformed_frames += what_frame in {w for w, _m in bad_images(random.Random(0))}
        if sent % 500 == 0:
            say(f"  {sent} requests sent, {len(results)} answered, node {'alive' if node.alive() else 'DEAD'}")
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while len(results) < sent and time.monotonic() < deadline and node.alive():
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    with lock:
        answered = list(results)
    lost = sent - len(answered)
    wrong = []
    longest = 0
    by_expectation: dict[str, int] = {}
    for expect, what, service, response, _name in answered:
        by_expectation[expect] = by_expectation.get(expect, 0) + 1
        longest = max(longest, len(response.message))
        if expect == "fail" and (response.success or not response.message.strip()):
            wrong.append(f"{service}: {what} was {'accepted' if response.success else 'refused without a message'}")
        elif expect == "ok" and not response.success:
            wrong.append(f"{service}: {what} was refused: {response.message[:200]}")
        elif expect == "any" and not response.success and not response.message.strip():
            wrong.append(f"{service}: {what} was refused without a message")
        if len(response.message) > MAX_REPLY_CHARS:
            wrong.append(f"{service}: {what}: a {len(response.message)}-character reply")
    # The node still serves frames after all that.
    after = time.monotonic()
    good_frame = image_msg(pixels(1))
    for _ in range(30):
        client.publish_frame(good_frame)
        time.sleep(0.1)
    time.sleep(1.0)
    detections_after = len(client.since(after))
    log_growth = node.log_bytes() - log_before
    new_tracebacks = node.tracebacks() - tracebacks_before
    distinct_wrong = sorted(set(wrong))
    figures.update(requests_sent=sent, requests_answered=len(answered), requests_lost=lost,
                   answered_as_expected=len(answered) - len(wrong), wrong_answers=len(wrong),
                   by_expectation=by_expectation, frames_sent=frames_sent, malformed_frames=malformed_frames,
                   detection_messages_after=detections_after, longest_reply_chars=longest,
                   node_log_growth_bytes=log_growth, node_tracebacks=new_tracebacks, seconds=round(elapsed, 1))
    report.check(lost == 0, f"{lost} fuzzed requests never answered")
    report.check(not wrong, f"{len(wrong)} fuzzed requests answered wrongly: {distinct_wrong[:10]}")
    report.check(node.alive(), "the node died during the fuzz")
    report.check(new_tracebacks == 0, f"the node logged {new_tracebacks} tracebacks during the fuzz")
    report.check(log_growth <= MAX_FUZZ_LOG_BYTES, f"the node's log grew {log_growth} bytes during the fuzz")
    report.check(detections_after > 0, "the node published no detections after the fuzz")
