"""``personal-vlm store …``: look after a concept store itself — repair a local folder's index, copy
concepts between a local store and a fleet library (push / pull), check one's integrity."""

from __future__ import annotations

from .output import emit as _emit
from .output import stderr_progress


def add_store_parser(sub, parser_class) -> None:
    store = sub.add_parser("store", help="look after the concept store itself (--store: a folder or a postgresql:// URL)")
    verbs = store.add_subparsers(dest="store_command", required=True, parser_class=parser_class)
    repair = verbs.add_parser(
        "repair", help="rebuild a lost or damaged index from the concept folders (stop the nodes using it first)")
    repair.add_argument("--force", action="store_true", help="rebuild even when the index looks healthy")
    push = verbs.add_parser("push", help="copy every concept of --store into another store (e.g. a fleet library)")
    push.add_argument("target", help="where to copy to: a postgresql:// URL or a store folder")
    pull = verbs.add_parser("pull", help="copy every concept of another store (e.g. a fleet library) into --store")
    pull.add_argument("source", help="where to copy from: a postgresql:// URL or a store folder")
    for verb in (push, pull):
        verb.add_argument("--overwrite", action="store_true", help="replace concepts the target has already")
    verbs.add_parser("check", help="read back every concept of --store: records, memories, pictures")


def cmd_store(args) -> int:
    from .store import open_library

    if args.store_command == "repair":
        from .store.repair import repair_store

        report = repair_store(args.store, force=args.force, progress=stderr_progress())
        _emit(args, report.as_dict(), "\n".join(report.lines()))
        return 0
    if args.store_command == "check":
        from .store.transfer import check_library

        library = open_library(args.store)
        try:
            report = check_library(library)
        finally:
            library.close()
        _emit(args, report.as_dict(), "\n".join(report.lines()))
        return 1 if report.problems else 0
    from .store.transfer import copy_concepts

    source_location, target_location = ((args.store, args.target) if args.store_command == "push"
                                         else (args.source, args.store))
    source = open_library(source_location)
    try:
        target = open_library(target_location)
        try:
            report = copy_concepts(source, target, overwrite=args.overwrite, progress=stderr_progress())
        finally:
            target.close()
    finally:
        source.close()
    _emit(args, report.as_dict(), "\n".join(report.lines()))
    return 1 if report.failed else 0
