"""``personal-vlm bench --library URL``: the fleet library's prefilter at 1k / 10k / 100k concepts.

The matcher's prefilter keeps, of C concepts, the ``prefilter_top`` whose pooled vector p_c comes
closest to any frame token: max_j cos(p_c, F[j]). In memory that is one (C, D) x (D, N) matmul over
every concept; in the library it is pgvector's HNSW index, asked once per query vector
(:meth:`PostgresLibrary.nearest`). This measures both on one synthetic library, at each size:

- the time of one frame's prefilter: in memory (C pooled vectors resident), and in the database
  with every frame token as a query and with 16 region means as queries;
- recall: the share of the in-memory top-``k`` the database returns, and the share of the concepts
  actually planted in the frame (3 per frame) that each method keeps;
- the time of one teach (:meth:`PostgresLibrary.add`) into a library of that size.

Synthetic data, so it says how the two scale, not how well a real backbone's vectors separate:
concept c has a direction u_c (random unit, D dimensions); its memory is K tokens u_c + noise; a
frame holds N tokens, 3 planted concepts' tokens (u_c + noise) among random background tokens.
The database must be empty (refused otherwise): the benchmark writes up to the largest size of
synthetic concepts and removes them at the end.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import save

from .errors import PersonalVLMError

BENCH_MODEL = "bench|synthetic-library|r0|float32|d{dim}"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _frame(directions: torch.Tensor, planted: list[int], n: int, k: int, noise: float, generator):
    """(N, D) frame tokens: k noisy tokens of each planted concept, the rest random background."""
    d = directions.shape[1]
    parts = [_unit(directions[c] + noise * torch.randn(k, d, generator=generator) / d ** 0.5) for c in planted]
    background = _unit(torch.randn(n - k * len(planted), d, generator=generator))
    return torch.cat(parts + [background])


def _regions(frame: torch.Tensor, count: int = 16) -> torch.Tensor:
    """(count, D) means of consecutive token runs: a frame's tokens in row order, pooled coarsely."""
    return _unit(torch.stack([chunk.mean(dim=0) for chunk in frame.chunk(count)]))


def _fill(conn, first: int, last: int, directions: torch.Tensor, model: str, tokens: int, noise: float,
          generator) -> list[list[float]]:
    """Concepts ``first``…``last - 1`` written with COPY; their pooled vectors, as the library keeps them."""
    from .store.postgres_schema import ensure_pooled_index, pooled_vector, vector_literal
    from .store.records import model_key
    import uuid

    d = directions.shape[1]
    ensure_pooled_index(conn, d)
    with conn.cursor() as cur:
        with cur.copy("COPY concepts (name, category, keywords, fingerprint, fingerprint_complete, memory_tokens, "
                      "model_identity, created, updated, extra) FROM STDIN") as copy:
            for c in range(first, last):
                copy.write_row((f"bench concept {c:06d}", "thing", "[]", "{}", None, tokens, model, 0.0, 0.0, "{}"))
        pooled = []
        with cur.copy("COPY memories (name, model, model_identity, memory_tokens, version, updated, data, dim, pooled) "
                      "FROM STDIN") as copy:
            for c in range(first, last):
                memory = {"memory": _unit(directions[c] + noise * torch.randn(tokens, d, generator=generator) / d ** 0.5)}
                pooled.append(pooled_vector(memory))
                copy.write_row((f"bench concept {c:06d}", model_key(model), model, tokens, uuid.uuid4(), 0.0,
                                save(memory), d, vector_literal(pooled[-1])))
    return pooled


def run_library_bench(url: str, sizes=(1000, 10000, 100000), dim: int = 256, frame_tokens: int = 256,
                      top: int = 64, frames: int = 5, progress=None) -> dict:
    from .store.postgres import PostgresLibrary
    from .store.records import ConceptRecord
    from PIL import Image

    say = progress or (lambda message: None)
    library = PostgresLibrary(url)
    if len(library):
        library.close()
        raise PersonalVLMError(f"bench --library writes and removes {max(sizes):,} synthetic concepts: give it an "
                               f"empty database, not {library.location()} ({len(library)} concepts in it)")
    generator = torch.Generator().manual_seed(0)
    model, tokens, noise = BENCH_MODEL.format(dim=dim), 8, 2.0
    directions = _unit(torch.randn(max(sizes), dim, generator=generator))      # (C_max, D)
    report = {"library": library.location(), "dim": dim, "frame_tokens": frame_tokens, "top": top,
              "frames": frames, "memory_tokens": tokens, "sizes": {}}
    done, vectors = 0, []
    conn = library._connector.connect()
    try:
        for size in sorted(sizes):
            say(f"filling the library to {size:,} concepts…")
            t0 = time.perf_counter()
            with conn.transaction():
                vectors += _fill(conn, done, size, directions, model, tokens, noise, generator)
            fill_s = time.perf_counter() - t0
            done = size
            conn.execute("ANALYZE memories")
            pooled = torch.tensor(vectors)                                     # (C, D), unit rows
            memory_s, db_all_s, db_regions_s, recall_all, recall_regions = [], [], [], [], []
            planted_hits = {"memory": 0, "db_all": 0, "db_regions": 0}
            planted_total = 0
            for f in range(frames + 1):                # the first frame warms the caches, untimed
                picks = torch.randperm(size, generator=generator)[:3].tolist()
                frame = _frame(directions, picks, frame_tokens, tokens, noise, generator)
                t = time.perf_counter()
                coarse = (pooled @ frame.T).max(dim=1).values                  # (C,)
                exact = [f"bench concept {c:06d}" for c in torch.topk(coarse, min(top, size)).indices.tolist()]
                t_memory = time.perf_counter() - t
                t = time.perf_counter()
                by_all = library.nearest(model, frame, top)
                t_all = time.perf_counter() - t
                t = time.perf_counter()
                by_regions = library.nearest(model, _regions(frame), top)
                t_regions = time.perf_counter() - t
                if f == 0:
                    continue
                memory_s.append(t_memory)
                db_all_s.append(t_all)
                db_regions_s.append(t_regions)
                recall_all.append(len(set(by_all) & set(exact)) / len(exact))
                recall_regions.append(len(set(by_regions) & set(exact)) / len(exact))
                names = [f"bench concept {c:06d}" for c in picks]
                planted_total += len(names)
                planted_hits["memory"] += len(set(names) & set(exact))
                planted_hits["db_all"] += len(set(names) & set(by_all))
                planted_hits["db_regions"] += len(set(names) & set(by_regions))
            record = ConceptRecord(name=f"bench teach {size}", category="thing", keywords=[], fingerprint={},
                                   fingerprint_complete=None, memory_tokens=tokens, model_identity=model)
            memory = {"memory": _unit(torch.randn(tokens, dim, generator=generator))}
            t = time.perf_counter()
            library.add(record, memory, [Image.new("RGB", (64, 64))])
            teach_s = time.perf_counter() - t
            library.forget(record.name)
            median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            report["sizes"][str(size)] = {
                "fill_s": fill_s, "teach_s": teach_s,
                "memory_prefilter_ms": 1000 * median(memory_s),
                "db_prefilter_all_tokens_ms": 1000 * median(db_all_s),
                "db_prefilter_16_regions_ms": 1000 * median(db_regions_s),
                "db_recall_of_memory_top_all_tokens": sum(recall_all) / len(recall_all),
                "db_recall_of_memory_top_16_regions": sum(recall_regions) / len(recall_regions),
                "planted_recall": {k: v / planted_total for k, v in planted_hits.items()},
            }
            say(f"{size:,} concepts: in memory {1000 * median(memory_s):.1f} ms, database "
                f"{1000 * median(db_all_s):.1f} ms (all tokens) / {1000 * median(db_regions_s):.1f} ms (16 regions)")
    finally:
        with conn.transaction():
            conn.execute("DELETE FROM concepts WHERE model_identity = %s", (model,))
        conn.execute("VACUUM concepts, memories, pictures")
        conn.close()
        library.close()
    return report


def format_library_table(report: dict) -> str:
    rows = [("library", report["library"]),
            ("data", f"synthetic, D={report['dim']}, {report['frame_tokens']} frame tokens, "
                     f"top {report['top']}, median of {report['frames']} frames")]
    for size, entry in report["sizes"].items():
        n = f"{int(size):,}"
        rows.append((f"{n}: prefilter in memory", f"{entry['memory_prefilter_ms']:.1f} ms"))
        rows.append((f"{n}: prefilter pgvector, every token / 16 regions",
                     f"{entry['db_prefilter_all_tokens_ms']:.1f} ms / {entry['db_prefilter_16_regions_ms']:.1f} ms"))
        rows.append((f"{n}: pgvector recall of the in-memory top",
                     f"{entry['db_recall_of_memory_top_all_tokens']:.2f} / {entry['db_recall_of_memory_top_16_regions']:.2f}"))
        planted = entry["planted_recall"]
        rows.append((f"{n}: planted concepts kept (memory, pgvector tokens, regions)",
                     f"{planted['memory']:.2f} / {planted['db_all']:.2f} / {planted['db_regions']:.2f}"))
        rows.append((f"{n}: one teach into the library", f"{entry['teach_s'] * 1000:.0f} ms"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
