"""Concept store: the user's taught objects, kept on disk so they survive restarts.

Layout under ``root`` (default ``$XDG_DATA_HOME/personal_vlm``)::

    personal_vlm_store.json    marker: this folder is a concept store (written first, never removed)
    concepts.db                SQLite index (WAL), one row per concept
    concepts/<uuid hex>/       one directory per concept *version*
        memory.safetensors     the concept memory, tensors stored verbatim
        ref_0.jpg, ref_1.png   the reference pictures, kept to rebuild the memory: the photo's own
                               file when it came encoded (JPEG/PNG/WebP), else a PNG
        record.json            the concept's row as of its latest change: with the files beside
                               it, everything ``repair`` needs to rebuild a lost index
    concepts/<uuid hex>/       or a memory of the concept for another model: memory.safetensors
                               and a record.json naming the concept and the model
    tmp/<uuid hex>/            a version being written
    store.lock                 serialises writers across processes

A concept's row points at the version it was taught with (its pictures and that model's memory).
The ``memories`` table holds the concept's memories for other models, one per concept and model,
each in a directory of its own: a node on one model and a command on another never overwrite each
other's memories, and each uses only its own model's. Precision is not part of that key: a memory
built in float32 is cast for a model loaded in bfloat16 instead of being rebuilt.

Every file is private to the user (0600 in 0700 folders, whatever the umask), SQLite's
``secure_delete`` overwrites what a forget removes from the index, and a forget checkpoints the
write-ahead log so the forgotten text does not wait there for the last connection to close.

The store only ever deletes what it wrote. A folder is a store when it holds the marker (or, for
stores written before markers, an index of this format); any other non-empty folder is refused,
and so is a store whose ``concepts/``, ``tmp/`` or index is a symbolic link. A store whose index is
missing or empty while concept folders exist is refused too, with a pointer to ``personal-vlm
store repair`` (:mod:`personal_vlm_node.store.repair`), which rebuilds the index from the folders.

A version's memory and pictures are never modified after it is published: ``add`` and
``replace_memory`` first record the new directory's name in the index's ``pending`` table, write it
under ``tmp/``, fsync it, rename it into ``concepts/`` and only then point the row at it in one
SQLite transaction, which also records the replaced directories as pending deletion. The row is
the commit point, so after a crash at any instant a concept is either wholly present (row + all
its files) or wholly absent. Garbage collection, when a store is opened, removes exactly the
``pending`` entries no row references, and in them only the files the store writes: a folder the
index does not know is never touched, whatever its name.

Names are user text and are never used in paths; directories are named by random uuids.
"""

# The package's parts, by job: layout (file names, modes, format), records (what it hands out),
# errors (causes and advice), files (durable I/O, removing only its own files), index (SQLite),
# folder (what a folder is), versions (the publish / pending / collect protocol), local
# (ConceptStore), repair (rebuilding a lost index); library (ConceptLibrary: the interface every
# backend implements, this folder's and a shared database's); postgres* (PostgresLibrary, the fleet
# library: connection, schema, watcher), offline (its local copy); open (a location → a backend).
from personal_vlm_node.names import MAX_NAME_CHARS, validate_category, validate_name

from .folder import identify_folder
from .index import StoreWatcher
from .layout import SCHEMA_VERSION
from .library import ConceptLibrary, LibraryWatcher
from .local import ConceptStore
from .open import open_library
from .records import ConceptRecord, ForgetResult, MemoryMissing, default_store_dir, model_key

__all__ = ["MAX_NAME_CHARS", "SCHEMA_VERSION", "ConceptLibrary", "ConceptRecord", "ConceptStore", "ForgetResult", "MemoryMissing",
           "LibraryWatcher", "StoreWatcher", "default_store_dir", "identify_folder", "model_key", "open_library", "validate_category", "validate_name"]
