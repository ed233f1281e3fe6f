"""Scenario 5, soak: frames at the node's rate plus periodic requests; memory, latency drift, no crash."""

from __future__ import annotations

import time

from ..kit import image_msg, pixels
from .client import FieldClient, teach_type, node_names, teach_request
from .world import NodeRun, Report, World, percentile, say


# ---- scenario 5: soak ------------------------------------------------------------------------

def soak(report: Report, world: World, node: NodeRun, client: FieldClient, minutes: float, rate_hz: float) -> None:
    from personal_vlm_interfaces.srv import Ask, ForgetConcept

    figures = report.scenario("soak")
    say(f"scenario 5: soak for {minutes:g} min, frames at {rate_hz:g} Hz plus periodic requests")
    shown = pixels(9500)
    response = client.send(teach_type(), "teach_concept", teach_request("soak thing", [shown], overwrite=True))
    report.check(response is not None and response.success, "the node could not teach 'soak thing'")
    frame = image_msg(shown)
    t0 = time.monotonic()
    end = t0 + minutes * 60.0
    rss: list[tuple[float, float]] = []
    requests = {"sent": 0, "failed": 0}
    first_stamp = client.last_stamp + 1
    next_frame = next_list = next_ask = next_teach = next_rss = t0
    teach_cycle = 0
    while time.monotonic() < end and node.alive():
        now = time.monotonic()
        if now >= next_frame:
            client.publish_frame(frame)
            next_frame += 1.0 / rate_hz
        if now >= next_rss:
            value = node.rss_mb()
            if value is not None:
                rss.append((now - t0, value))
            next_rss += 5.0
        calls = []
        if now >= next_list:
            calls.append(lambda: node_names(client) is not None)
            next_list += 2.0
        if now >= next_ask:
            calls.append(lambda: _ok(client.send(Ask, "ask", Ask.Request(question="is my thing here?", image=frame))))
            next_ask += 20.0
        if now >= next_teach:
            teach_cycle += 1
            temp = f"soak temp {teach_cycle}"
            calls.append(lambda temp=temp: _ok(client.send(teach_type(), "teach_concept",
                                                           teach_request(temp, [pixels(9600 + teach_cycle)]))))
            calls.append(lambda temp=temp: _ok(client.send(ForgetConcept, "forget_concept",
                                                           ForgetConcept.Request(name=temp))))
            next_teach += 30.0
        for call in calls:
            requests["sent"] += 1
            requests["failed"] += not call()
        time.sleep(max(0.0, min(next_frame, next_rss, next_list) - time.monotonic()))
    time.sleep(1.0)
    latencies = []                # (seconds into the soak, latency)
    for received, _wall, stamp, names in client.since(t0):
        if stamp[0] >= first_stamp and stamp in client.published:
            latencies.append((client.published[stamp] - t0, received - client.published[stamp]))
    span = max(1e-9, time.monotonic() - t0)
    first = [lat for at, lat in latencies if at < span / 3]
    last = [lat for at, lat in latencies if at >= 2 * span / 3]
    p95_first, p95_last = percentile(first, 95), percentile(last, 95)
    warm = [v for at, v in rss if at >= span / 4] or [v for _at, v in rss]
    growth = (warm[-1] - warm[0]) if warm else None
    frames_published = client.last_stamp - first_stamp + 1
    figures.update(minutes=round(span / 60.0, 2), frames_published=frames_published,
                   detection_messages=len(latencies), requests_sent=requests["sent"],
                   requests_failed=requests["failed"],
                   p50_latency_s=percentile([lat for _a, lat in latencies], 50),
                   p95_latency_first_third_s=p95_first, p95_latency_last_third_s=p95_last,
                   rss_mb_start=rss[0][1] if rss else None, rss_mb_after_warmup=warm[0] if warm else None,
                   rss_mb_end=rss[-1][1] if rss else None, rss_growth_mb_after_warmup=growth,
                   rss_samples=[[round(a, 1), round(v, 1)] for a, v in rss])
    report.check(node.alive(), "the node died during the soak")
    report.check(requests["failed"] == 0, f"{requests['failed']} of {requests['sent']} soak requests failed")
    report.check(len(latencies) >= 0.5 * frames_published,
                 f"only {len(latencies)} detection messages for {frames_published} frames in the soak")
    if p95_first is not None and p95_last is not None:
        report.check(p95_last <= max(2.0 * p95_first, p95_first + 0.25),
                     f"frame latency p95 drifted from {p95_first:.3f} s to {p95_last:.3f} s")
    if growth is not None:
        report.check(growth <= 64.0, f"the node's RSS grew {growth:.1f} MB after warm-up")


def _ok(response) -> bool:
    return response is not None and response.success
