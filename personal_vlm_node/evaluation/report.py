"""The reports of ``personal-vlm eval``: markdown tables and the PNG charts (no plotting library)."""

from __future__ import annotations

import math
from pathlib import Path

WTD_PLOT = "wtd_per_concept.png"
HISTOGRAM_PLOT = "score_histogram.png"


# R2P without a contrastive image-text model: its scores come from the VLM being checked.
SELF_JUDGED_NAME = "vlm_yes_no"
SELF_JUDGED = ("no contrastive model configured: R2P's image-text (s_VT) and attribute (s_VA) scores are "
               "the same VLM's yes/no answers, so its verification is the model judging itself; pass "
               "--verifier-model (a CLIP/SigLIP) for an independent check")


def format_value(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _stage_lines(stages: dict) -> list[str]:
    """The per-stage table: which stage decided how many pairs, how right, and — on the pairs a
    stage after Ego decided — how right Ego alone was on them (does the stage earn its place?)."""
    if len(stages) < 2:
        return []
    lines = ["## Per stage", "",
             "Each pair is decided by one stage; \"Ego alone\" is Ego's own answer on the same pairs "
             "(p(yes) at the recognize threshold).", "",
             "| stage | decisions | right | positives | Wtd | recall | precision | Ego alone: right | Ego alone: Wtd |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, row in stages.items():
        alone = row.get("ego_alone") or {}
        cells = [row["decisions"], row["accuracy"], row["positives"], row["weighted_accuracy"], row["recall"],
                 row["precision"], alone.get("accuracy"), alone.get("weighted_accuracy")]
        lines.append(f"| {name} | " + " | ".join(format_value(c) for c in cells) + " |")
    return lines + [""]


def _icpt_line(icpt: dict) -> str:
    return (f"- ICPT: projector {icpt['projector']} ({icpt['projector_id']}), "
            f"{format_value(icpt['tokens_per_concept'])} prompt tokens per concept (Ego's memory: "
            f"{format_value(icpt['ego_tokens_per_concept'])}), {format_value(icpt['seconds_per_prompt'])} s to make "
            f"one (encoding the views: {format_value(icpt['seconds_per_encoding'])} s)")


def _ego_prompts(ego: dict) -> str:
    if ego["recognition"] == "joint":
        budget = f", {ego['context_tokens']} memory tokens" if ego.get("context_tokens") else ""
        return (f"joint recognition: each concept asked in one prompt with the other concepts while they fit "
                f"(at most {ego['memories_per_prompt']} memories{budget}; the best-matching first beyond)")
    return "one prompt per concept"


def results_markdown(results: dict) -> str:
    """The results as markdown tables."""
    columns = ("positives", "negatives", "positive_accuracy", "negative_accuracy", "weighted_accuracy",
               "precision", "recall", "f1")
    header = "| concept | pos | neg | pos acc | neg acc | Wtd | precision | recall | F1 |"
    rule = "|---|--:|--:|--:|--:|--:|--:|--:|--:|"

    def row(name, metrics):
        cells = [format_value(metrics[k]) for k in columns]
        return f"| {name.replace('|', '/')} | " + " | ".join(cells) + " |"

    data, timing = results["dataset"], results["timing"]
    lines = [
        f"# Recognition: `{results['method']}` on {Path(data['root']).name}",
        "",
        f"- model: `{results['model']}`",
        f"- dataset: {data['root']} (layout {data['layout']}, {data['concepts']} concepts, "
        f"{data['queries']} of {data['of_queries']} queries"
        f"{', ' + str(data['failed']) + ' failed' if data.get('failed') else ''}, {data['shots']} shot(s))",
        "- thresholds: " + ", ".join(f"{k} {format_value(v)}" for k, v in results["thresholds"].items()),
        f"- R2P: top-{results['r2p']['top_k']} of the matcher's top {results['r2p']['pool']}, "
        f"text similarity {results['r2p']['text_similarity']}, pairwise step beside the candidate's "
        f"{'reference picture' if results['r2p'].get('pairwise_reference', 'image') == 'image' else 'memory'}"
        + (f"\n  - {SELF_JUDGED}" if results['method'] in ('r2p', 'cascade')
           and results['r2p']['text_similarity'] == SELF_JUDGED_NAME else ""),
        *([f"- Ego: {_ego_prompts(results['ego'])}"] if results.get("ego") and results["method"] != "match" else []),
        *([_icpt_line(results["icpt"])] if results.get("icpt") else []),
        "- decided by: " + (", ".join(f"{k} {v}" for k, v in sorted(results["decided_by"].items())) or "–"),
        f"- seconds per query {format_value(timing['seconds_per_query'])}, per concept introduction "
        f"{format_value(timing['seconds_per_concept_introduction'])} (fingerprint complete after "
        f"{format_value(timing['seconds_per_fingerprint'])})",
        "",
        "## Overall",
        "",
        header, rule, row("all pairs", results["overall"]),
        "",
        f"Mean Wtd over concepts: {format_value(results['macro_weighted_accuracy'])}",
        "",
        *_stage_lines(results.get("stages") or {}),
        "## Per concept",
        "",
        header, rule,
        *[row(name, metrics) for name, metrics in results["per_concept"].items()],
        "",
        f"![Wtd per concept]({WTD_PLOT})",
        "",
        f"![Scores of positives and negatives]({HISTOGRAM_PLOT})",
        "",
    ]
    if results["errors"]:
        lines += ["## Queries that failed", ""] + [f"- {e['query']}: {e['error']}" for e in results["errors"]] + [""]
    return "\n".join(lines)


def _latin1(text: str) -> str:
    # Pillow's built-in bitmap font covers Latin-1 only.
    return text.encode("latin-1", "replace").decode("latin-1")


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bar_chart_png(values: dict[str, float | None], title: str, max_rows: int = 200) -> bytes:
    """Horizontal bars of values in [0, 1], one row per name (the first ``max_rows``)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    names = list(values)[:max_rows]
    label_w, bar_w, row_h, top = 190, 420, 18, 34
    image = Image.new("RGB", (label_w + bar_w + 70, top + row_h * max(1, len(names)) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), _latin1(title), fill="black", font=font)
    for x in (0.0, 0.5, 1.0):
        px = label_w + round(x * bar_w)
        draw.line([(px, top - 4), (px, top + row_h * len(names))], fill=(200, 200, 200))
        draw.text((px - 8, top + row_h * len(names) + 6), f"{x:.1f}", fill="black", font=font)
    for i, name in enumerate(names):
        y = top + i * row_h
        label = name if len(name) <= 28 else name[:27] + "…"
        draw.text((10, y + 3), _latin1(label), fill="black", font=font)
        value = values[name]
        if value is None:
            draw.text((label_w + 4, y + 3), "n/a", fill=(120, 120, 120), font=font)
            continue
        width = round(min(1.0, max(0.0, value)) * bar_w)
        draw.rectangle([label_w, y + 2, label_w + max(1, width), y + row_h - 3], fill=(66, 114, 196))
        draw.text((label_w + width + 4, y + 3), f"{value:.3f}", fill="black", font=font)
    return _png(image)


def histogram_png(positives: list[float], negatives: list[float], score_name: str,
                  markers: dict[str, float] | None = None, bins: int = 20) -> bytes:
    """Side-by-side histogram (share of each class per bin) of positives' and negatives' scores."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    markers = {k: v for k, v in (markers or {}).items() if v is not None}
    everything = positives + negatives + list(markers.values())
    lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width, height, left, right, top, bottom = 640, 340, 50, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), _latin1(f"{score_name}: positives (n={len(positives)}) vs negatives (n={len(negatives)})"),
              fill="black", font=font)

    def shares(values):
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
        return [c / len(values) if values else 0.0 for c in counts]

    pos, neg = shares(positives), shares(negatives)
    peak = max(pos + neg + [1e-9])
    slot = plot_w / bins
    colours = {"positives": (46, 139, 87), "negatives": (214, 96, 77)}
    for b in range(bins):
        x0 = left + b * slot
        for offset, share, colour in ((0.1, pos[b], colours["positives"]), (0.5, neg[b], colours["negatives"])):
            if share > 0:
                bar_h = share / peak * plot_h
                draw.rectangle([x0 + offset * slot, top + plot_h - bar_h, x0 + (offset + 0.4) * slot, top + plot_h],
                               fill=colour)
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    for value in (lo, (lo + hi) / 2, hi):
        x = left + (value - lo) / (hi - lo) * plot_w
        draw.text((x - 12, top + plot_h + 6), f"{value:.2f}", fill="black", font=font)
    draw.text((4, top - 4), f"{peak:.2f}", fill="black", font=font)
    draw.text((4, top + plot_h - 10), "0", fill="black", font=font)
    draw.text((4, top + plot_h + 20), "share of each class per bin", fill=(90, 90, 90), font=font)
    for name, value in markers.items():
        x = left + (value - lo) / (hi - lo) * plot_w
        draw.line([(x, top), (x, top + plot_h)], fill=(90, 90, 90))
        label = _latin1(f"{name} {value:.2f}")
        text_w = draw.textlength(label, font=font)
        # Above the plot, on the side of the line that keeps the label inside the picture.
        draw.text((x + 3 if x + 3 + text_w < width else x - 3 - text_w, top - 14), label, fill=(90, 90, 90), font=font)
    legend_y = height - 16
    for i, (name, colour) in enumerate(colours.items()):
        x = left + 300 + i * 120
        draw.rectangle([x, legend_y, x + 10, legend_y + 10], fill=colour)
        draw.text((x + 14, legend_y), name, fill="black", font=font)
    return _png(image)


# ---- command line ----------------------------------------------------------------------------
