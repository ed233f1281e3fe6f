"""Recognition metrics of ``personal-vlm eval``: counts per pair, accuracies, precision, recall, F1."""

from __future__ import annotations

from dataclasses import asdict, dataclass

@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, positive: bool, predicted: bool) -> None:
        if positive:
            if predicted:
                self.tp += 1
            else:
                self.fn += 1
        elif predicted:
            self.fp += 1
        else:
            self.tn += 1


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def recognition_metrics(counts: Counts) -> dict:
    """Positive / negative / weighted accuracy, precision, recall, F1 (None where undefined)."""
    positive = _ratio(counts.tp, counts.tp + counts.fn)
    negative = _ratio(counts.tn, counts.tn + counts.fp)
    precision = _ratio(counts.tp, counts.tp + counts.fp)
    weighted = None if positive is None or negative is None else (positive + negative) / 2
    if precision is None or positive is None:
        f1 = None
    else:
        f1 = 0.0 if precision + positive == 0 else 2 * precision * positive / (precision + positive)
    return {**asdict(counts), "positives": counts.tp + counts.fn, "negatives": counts.tn + counts.fp,
            "positive_accuracy": positive, "negative_accuracy": negative, "weighted_accuracy": weighted,
            "precision": precision, "recall": positive, "f1": f1}


def summarize(records: list[dict], concepts: list[str]) -> dict:
    """Overall and per-concept metrics from per-query records (records with an error are skipped)."""
    overall, per_concept = Counts(), {c: Counts() for c in concepts}
    sources: dict[str, int] = {}
    for record in records:
        for pair in record.get("pairs", []):
            if pair["concept"] not in per_concept:
                continue
            overall.add(pair["label"], pair["predicted"])
            per_concept[pair["concept"]].add(pair["label"], pair["predicted"])
            sources[pair["source"]] = sources.get(pair["source"], 0) + 1
    per = {c: recognition_metrics(k) for c, k in per_concept.items()}
    weighted = [m["weighted_accuracy"] for m in per.values() if m["weighted_accuracy"] is not None]
    return {"overall": recognition_metrics(overall), "per_concept": per, "decided_by": sources,
            "macro_weighted_accuracy": sum(weighted) / len(weighted) if weighted else None}
