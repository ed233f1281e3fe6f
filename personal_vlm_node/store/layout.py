"""What a store folder holds: the names of its files and folders, their modes, the index format."""

from __future__ import annotations

import re

SCHEMA_VERSION = 3
# The index and record.json name a concept's model identity (VLMAdapter.identity) `model_fingerprint`,
# as every store written so far does; in code it is ConceptRecord.model_identity.

_DB_FILE = "concepts.db"

_LOCK_FILE = "store.lock"

_MEMORY_FILE = "memory.safetensors"

_RECORD_FILE = "record.json"

_MARKER_FILE = "personal_vlm_store.json"

_MARKER_FORMAT = "personal_vlm_node concept store"

_STORE_DIRS = {"concepts", "tmp"}

# Everything a store keeps at its top level; a folder holding anything else is not a store.
_STORE_ENTRIES = _STORE_DIRS | {_DB_FILE, _DB_FILE + "-wal", _DB_FILE + "-shm", _DB_FILE + "-journal",
                                _LOCK_FILE, _MARKER_FILE}

_VERSION_NAME = re.compile(r"^[0-9a-f]{32}$")

# The only files the store writes in a version directory, and so the only ones it removes.
_OWN_FILE = re.compile(r"^(memory\.safetensors|record\.json(\.tmp)?|ref_[0-9]+\.(png|jpg|webp))$")

_FILE_MODE = 0o600

_DIR_MODE = 0o700

# Encoded photos kept as they came, by format.
_SUFFIXES = {"JPEG": ".jpg", "WEBP": ".webp", "PNG": ".png"}

# Modes the PNG writer stores losslessly.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}
