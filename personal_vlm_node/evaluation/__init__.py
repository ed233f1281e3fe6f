"""``personal-vlm eval``: how well taught concepts are recognised, on a personalization dataset.

Protocol (the recognition task of MyVLM, Yo'LLaVA and R2P): each concept is taught from its first
``--shots`` training images (sorted by name, numbers in natural order); each test image is a
query; every (query, concept) pair is a *positive* when the concept is in the query and a
*negative* otherwise. A method says present / absent for every pair:

- ``match``    the matcher's late-interaction score s_c ≥ the accept threshold;
- ``ego``      Ego's in-context check, p_yes ≥ the recognition threshold;
- ``icpt``     ICPT's prompts in Ego's place (one prompt per concept, or all in one with
               ``--recognition joint``), p_yes ≥ the profile's ``icpt.threshold``; needs a projector
               (``--icpt-projector`` or the profile's ``icpt.projector``);
- ``r2p``      R2P's decision among the matcher's top ``--r2p-pool`` concepts (present iff chosen);
- ``cascade``  what the frame path does: the matcher's accept / reject stand, its uncertain band
               goes to Ego (or ICPT, ``--recognition-method icpt``), and R2P settles what that
               one is unsure of (|p_yes − threshold| < margin).

Metrics, per concept and over all pairs:
    positive accuracy  TP / (TP + FN)      (recall on positives)
    negative accuracy  TN / (TN + FP)      (specificity on negatives)
    Wtd                ½ (positive accuracy + negative accuracy)
    precision          TP / (TP + FP),   recall = positive accuracy,   F1 = 2PR / (P + R)
A ratio with a zero denominator is reported as null. Also: seconds per query and per concept
introduction (until usable, and until its fingerprint is complete).

Dataset layouts (``--layout auto`` detects them in this order):

- ``generic``  ``ROOT/concepts/<name>/*`` reference images of each concept (the first ``--shots``
               are used) and ``ROOT/queries.json``: a list of ``{"image": "path/relative/to/ROOT",
               "concepts": ["names", "present"]}``; an empty list is a pure negative, several
               names a multi-concept image.
- ``perva``    ``ROOT/{train,test}/<category>/<concept>/*`` (PerVA); ``ROOT/{train,test}/<concept>/*``
               without the category level is read the same way.
- ``yollava``  ``ROOT/{train,test}/<concept>/*`` as Yo'LLaVA is released, with the concept's hard
               negatives in ``ROOT/train/<concept>/negative_example/*``: each is a query that is a
               negative for that concept only; ``ROOT/<concept>/{train,test}/*`` is read too.
- ``myvlm``    ``ROOT/<concept>/*`` (MyVLM). The queries are the images listed in ``--test-list``
               (one ``<concept>/<file>`` per line, relative to ROOT; ``#`` comments) or else the
               last ``--test-last N`` images of each concept (default: every image after the
               first ``--shots``); the references are the first ``--shots`` of the others.

Outputs in ``--out DIR``: ``results.json``, ``results.md`` (tables), ``wtd_per_concept.png`` and
``score_histogram.png``; ``progress.jsonl`` gets one line per query as it completes and a rerun
skips the queries already there, so an interrupted run (Ctrl-C) resumes where it stopped. The
concepts are taught into ``DIR/store``, never into the user's own store.
"""


from .datasets import IMAGE_SUFFIXES, LAYOUTS, MAX_SHOTS, Dataset, Query, detect_layout, load_dataset, pairs
from .metrics import Counts, recognition_metrics, summarize
from .report import HISTOGRAM_PLOT, WTD_PLOT, bar_chart_png, histogram_png, results_markdown
from .run import (INTRODUCTIONS_FILE, METHODS, PROGRESS_FILE, RESULTS_JSON, RESULTS_MD, SETTINGS_FILE, EvalOptions,
                  evaluate, read_lines)

__all__ = ["Counts", "Dataset", "EvalOptions", "HISTOGRAM_PLOT", "IMAGE_SUFFIXES", "INTRODUCTIONS_FILE",
           "LAYOUTS", "MAX_SHOTS", "METHODS", "PROGRESS_FILE", "Query", "RESULTS_JSON", "RESULTS_MD",
           "SETTINGS_FILE", "WTD_PLOT", "bar_chart_png", "detect_layout", "evaluate", "histogram_png",
           "load_dataset", "pairs", "read_lines", "recognition_metrics", "results_markdown", "summarize"]
