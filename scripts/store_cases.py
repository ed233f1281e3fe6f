#!/usr/bin/env python3
"""The store's hostile-disk and hostile-user cases, run through the real command and file system.

    python scripts/store_cases.py [--code DIR] [--only CASE ...] [--repair-concepts N]

Each case builds a store in a scratch folder, does to it what a failing disk or a careless user
would (empty the index, point --store at a home folder, symlink a subfolder, poison a memory,
damage a page, fill the disk, make a folder immutable, forget while a node holds the store open),
then runs ``personal-vlm`` as a user would and checks that nothing was lost and that the answer is
one clear line. It imports nothing of the package itself: every step is a child process, so
``--code DIR`` (a checkout's root; default: this script's own) measures another version of the
code the same way.

The tests use its ``poison_memory`` and ``fill_disk`` too. Cases needing root (a small tmpfs for the full disk, chattr for immutable folders) are skipped
without it. Prints one line per case (held / FAILED / skipped, and why) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUP = r"""
import sys, torch
from PIL import Image
from personal_vlm_node.store import ConceptRecord, ConceptStore
store = ConceptStore(sys.argv[1])
for i, name in enumerate(sys.argv[2:]):
    record = ConceptRecord(name, "thing", ["red"], {}, None, 4, "tiny|m|main|float32|d8")
    store.add(record, {"memory": torch.full((4, 8), float(i + 1))}, [Image.new("RGB", (6, 5), (i, i, i))])
"""


class Cases:
    def __init__(self, scratch: Path, code: Path):
        self.scratch = scratch
        self.env = dict(os.environ)
        # Child processes start in the scratch folder, so this is the only checkout they import.
        self.env["PYTHONPATH"] = str(code) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.env["HF_HUB_OFFLINE"] = "1"
        self.model: Path | None = None
        self.results: list[tuple[str, str, str]] = []

    # ---- helpers
    def py(self, script: str, *args, check=True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              env=self.env, timeout=600, cwd=self.scratch)
        if check and done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return done

    def cli(self, *args, store: Path | None = None, model: bool = False) -> subprocess.CompletedProcess:
        head = ["--store", str(store)] if store is not None else []
        if model:
            head += ["--model", str(self.tiny_model()), "--device", "cpu", "--dtype", "float32"]
        return subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", *head, *args], capture_output=True,
                              text=True, env=self.env, timeout=600, cwd=self.scratch)

    def store(self, name: str, concepts=("mug", "keys", "cane")) -> Path:
        root = self.scratch / name
        self.py(SETUP, root, *concepts)
        return root

    def tiny_model(self) -> Path:
        if self.model is None:
            self.model = self.scratch / "tiny-qwen"
            self.py("import sys\nfrom personal_vlm_node.testing.tiny_model import build_tiny_model\n"
                    "build_tiny_model(sys.argv[1], 'qwen2_5_vl')", self.model)
        return self.model

    @staticmethod
    def one_line_error(done: subprocess.CompletedProcess) -> str | None:
        """None when the command failed as a user error should (exit 2, one line); else what it did."""
        lines = done.stderr.strip().splitlines()
        if done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr:
            return None
        return f"exit {done.returncode}, {len(lines)} stderr lines: {lines[-1][:160] if lines else ''}"

    @staticmethod
    def dirs(root: Path) -> list[str]:
        return sorted(os.listdir(root / "concepts")) if (root / "concepts").is_dir() else []

    def record(self, case: str, ok: bool, detail: str) -> None:
        self.results.append((case, "held" if ok else "FAILED", detail))

    # ---- 1. a lost or empty index
    def lost_index(self):
        for how in ("truncated", "deleted"):
            root = self.store(f"lost-{how}")
            before = self.dirs(root)
            if how == "truncated":
                os.truncate(root / "concepts.db", 0)
            else:
                (root / "concepts.db").unlink()
            listed = self.cli("list", store=root)
            self.cli("list", store=root)
            kept = self.dirs(root) == before
            problem = self.one_line_error(listed)
            self.record(f"1 index {how}, then list", kept and problem is None,
                        f"{len(self.dirs(root))}/{len(before)} concept folders kept; "
                        + (problem or listed.stderr.strip()[:140]))

    # ---- 2. --store at a user's folder
    def users_folder(self):
        root = self.scratch / "home"
        (root / "tmp").mkdir(parents=True)
        (root / "tmp" / "draft.txt").write_text("draft")
        (root / "concepts").mkdir()
        (root / "concepts" / "essay.md").write_text("essay")
        (root / "notes.txt").write_text("notes")
        os.chmod(root, 0o755)
        done = self.cli("list", store=root)
        files = [p for p in ("tmp/draft.txt", "concepts/essay.md", "notes.txt") if (root / p).exists()]
        mode = oct(os.stat(root).st_mode & 0o777)
        self.record("2 --store at a folder with the user's files", len(files) == 3 and mode == "0o755"
                    and self.one_line_error(done) is None,
                    f"{len(files)}/3 files kept, folder mode {mode}; {done.stderr.strip()[:140]}")

    # ---- 3. symlinked subfolders
    def symlinks(self):
        for part in ("concepts", "tmp", "concepts.db"):
            root = self.store(f"link-{part}")
            elsewhere = self.scratch / f"elsewhere-{part}"
            elsewhere.mkdir()
            target = elsewhere / part
            if part == "tmp":
                target.mkdir()
                (target / "precious.txt").write_text("precious")
                shutil.rmtree(root / "tmp")
            else:
                shutil.move(root / part, target)
                if part == "concepts.db":
                    os.chmod(target, 0o644)
            os.symlink(target, root / part)
            before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
            mode = oct(os.stat(target).st_mode & 0o777)
            done = self.cli("list", store=root)
            after = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
            mode_after = oct(os.stat(target).st_mode & 0o777)
            self.record(f"3 store/{part} a symlink", before == after and mode == mode_after,
                        f"target entries {len(after)}/{len(before)}, mode {mode}->{mode_after}; "
                        f"{done.stderr.strip()[:120]}")

    # ---- 4. one damaged memory
    def nan_memory(self):
        root = self.scratch / "nan"
        pictures = {}
        for name, colour in (("mug", (200, 30, 30)), ("keys", (30, 200, 30))):
            pictures[name] = self.scratch / f"{name}.png"
            self.py("import sys\nfrom PIL import Image\nImage.new('RGB', (64, 48), tuple(map(int, sys.argv[2:])))"
                    ".save(sys.argv[1])", pictures[name], *colour)
            taught = self.cli("teach", name, str(pictures[name]), store=root, model=True)
            if taught.returncode != 0:
                raise RuntimeError(taught.stderr[-1000:])
        poison_memory(root, "mug")
        asked = self.cli("ask", "where are my keys?", "--image", str(pictures["keys"]), store=root, model=True)
        self.record("4 NaN in one memory: ask", asked.returncode == 0,
                    f"exit {asked.returncode}; {asked.stderr.strip().splitlines()[-1][:140] if asked.stderr.strip() else ''}")
        recognized = self.cli("--json", "recognize", str(pictures["keys"]), "--all", store=root, model=True)
        try:
            names = [c["name"] for c in json.loads(recognized.stdout, parse_constant=_refuse)["concepts"]]
            valid = f"valid JSON, concepts {names}"
        except (ValueError, KeyError) as e:
            names, valid = None, f"invalid JSON ({e})"
        self.record("4 NaN in one memory: --json recognize", recognized.returncode == 0 and names == ["keys"], valid)
        listed = self.cli("list", store=root)
        marked = any(line.startswith("mug\t") and "DAMAGED" in line for line in listed.stdout.splitlines())
        self.record("4 NaN in one memory: list marks it", marked, listed.stdout.strip().replace("\t", " ")[:160])

    # ---- 5. a malformed page
    def malformed_page(self):
        root = self.store("malformed")
        with sqlite3.connect(root / "concepts.db") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page = db.execute("PRAGMA page_size").fetchone()[0]
        with open(root / "concepts.db", "r+b") as f:
            f.seek(page)
            f.write(os.urandom(page))
        done = self.cli("list", store=root)
        problem = self.one_line_error(done)
        self.record("5 malformed index page, then list", problem is None,
                    problem or done.stderr.strip()[:160])

    # ---- 6. a full disk, an immutable folder
    def full_disk(self):
        mount = self.scratch / "disk"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True).returncode != 0:
            self.results.append(("6 full disk", "skipped", "cannot mount a tmpfs (needs root)"))
            return
        try:
            root = self.store("disk/store")
            filler = fill_disk(mount, 0)
            done = self.cli("forget", "mug", store=root)
            problem = self.one_line_error(done)
            self.record("6 disk full at COMMIT (forget)", problem is None and "full" in done.stderr,
                        problem or done.stderr.strip()[:160])
            filler.unlink()
            fill_disk(mount, 16 * 1024)
            listed = self.cli("list", store=root)
            self.record("6 list with <= 16 KB free", listed.returncode == 0 and len(listed.stdout.splitlines()) == 3,
                        f"exit {listed.returncode}; {(listed.stderr.strip() or listed.stdout.strip())[:140]}")
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)

    def immutable(self):
        root = self.store("immutable")
        if subprocess.run(["chattr", "+i", str(root / "tmp")], capture_output=True).returncode != 0:
            self.results.append(("6 immutable folder", "skipped", "chattr +i not available"))
            return
        try:
            done = self.py(SETUP, root, "lamp", check=False)
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
            self.record("6 EPERM (immutable tmp/) on teach", "disk space" not in last and "ermission" in last,
                        last[:160])
        finally:
            subprocess.run(["chattr", "-i", str(root / "tmp")], check=False)
        parts = [root, root / "concepts", root / "tmp", root / "concepts.db"]
        subprocess.run(["chattr", "+i", *map(str, parts)], check=False)
        try:
            listed = self.cli("list", store=root)
            self.record("9 a read-only store can be listed", listed.returncode == 0 and len(listed.stdout.splitlines()) == 3,
                        f"exit {listed.returncode}; {(listed.stderr.strip() or listed.stdout.strip())[:140]}")
        finally:
            subprocess.run(["chattr", "-i", *map(str, parts)], check=False)

    # ---- 8. forget for real
    def forget(self):
        root = self.store("forget", concepts=("Zebracane", "mug"))
        holder = sqlite3.connect(root / "concepts.db")      # as a running node holds the store open
        holder.execute("PRAGMA data_version").fetchone()
        done = self.cli("forget", "Zebracane", store=root)
        found = [p.name for p in root.glob("concepts.db*") if b"Zebracane" in p.read_bytes()]
        holder.close()
        self.record("8 forgotten name absent from the index and its log while open", done.returncode == 0 and not found,
                    f"found in {found}" if found else "not found in concepts.db*")
        root = self.store("forget-stuck", concepts=("mug", "keys"))
        with sqlite3.connect(root / "concepts.db") as db:
            (directory,) = db.execute("SELECT dir FROM concepts WHERE name='mug'").fetchone()
        folder = root / "concepts" / directory
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            self.results.append(("8 forget of an unremovable folder", "skipped", "chattr +i not available"))
            return
        try:
            done = self.cli("forget", "mug", store=root)
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        said = "could not remove" in done.stderr
        self.record("8 forget says when a folder could not be removed", said,
                    (done.stderr.strip() or done.stdout.strip())[:160])
        self.cli("list", store=root)
        self.record("8 ... and the next open removes it", not folder.exists(), f"folder exists: {folder.exists()}")

    # ---- 9. names and messages
    def names(self):
        root = self.scratch / "names"
        photo = self.scratch / "names.png"
        self.py("import sys\nfrom PIL import Image\nImage.new('RGB', (64, 48), (90, 60, 30)).save(sys.argv[1])", photo)
        for label, blank in (("U+3164", "\u3164"), ("U+FFA0", "\uffa0"), ("U+2800", "\u2800"),
                             ("a lone combining mark", "\u0301")):
            done = self.cli("teach", blank, str(photo), "--no-wait", store=root, model=True)
            self.record(f"9 blank name ({label}) refused", self.one_line_error(done) is None,
                        done.stderr.strip()[:140])
        self.cli("teach", "mug", str(photo), "--no-wait", store=root, model=True)
        for lookalike in ("mug\ufe0f", "\u043cug", "\uff4d\uff55\uff47"):
            done = self.cli("teach", lookalike, str(photo), "--no-wait", store=root, model=True)
            self.record(f"9 look-alike {lookalike.encode('unicode_escape').decode()} refused",
                        self.one_line_error(done) is None and "looks like" in done.stderr, done.stderr.strip()[:140])
        emoji = "\U0001f469\u200d\U0001f52c kit"
        self.cli("teach", emoji, str(photo), "--no-wait", store=root, model=True)
        listed = self.cli("list", store=root).stdout
        shown = next((line.split("\t")[0] for line in listed.splitlines() if "kit" in line), "")
        forgot = self.cli("forget", shown, store=root)
        self.record("9 a ZWJ emoji name listed as typed, and forget takes it back", shown == emoji and forgot.returncode == 0,
                    f"listed as {shown.encode('unicode_escape').decode()!r}; forget exit {forgot.returncode}")
        broken = self.scratch / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        done = self.cli("teach", "lamp", str(broken), store=root, model=True)
        self.record("9 an unreadable picture's message names it", "object at 0x" not in done.stderr
                    and self.one_line_error(done) is None, done.stderr.strip()[:140])

    # ---- repair at scale
    def repair_time(self, count: int):
        root = self.scratch / "repair"
        names = [f"concept {i:04d}" for i in range(count)]
        self.py(SETUP, root, *names)
        (root / "concepts.db").unlink()
        t0 = time.perf_counter()
        done = self.cli("--json", "store", "repair", store=root)
        seconds = time.perf_counter() - t0
        restored = len(json.loads(done.stdout)["restored"]) if done.returncode == 0 else 0
        listed = self.cli("--json", "list", store=root)
        usable = done.returncode == 0 and len(json.loads(listed.stdout)["concepts"]) == count
        self.record(f"store repair of {count} concepts", usable and restored == count,
                    f"{restored} restored in {seconds:.2f} s (command, start-up included)"
                    + ("" if done.returncode == 0 else f"; {done.stderr.strip()[:120]}"))


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def poison_memory(root: Path, name: str, tensor: str = "memory") -> None:
    """Four bytes that turn the first float of concept ``name``'s stored memory into a NaN, as a
    flipped bit on a failing disk would (the file still reads)."""
    with sqlite3.connect(root / "concepts.db") as db:
        (directory,) = db.execute("SELECT dir FROM concepts WHERE name=?", (name,)).fetchone()
    path = root / "concepts" / directory / "memory.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = json.loads(data[8:header])[tensor]["data_offsets"][0]
    data[header + start:header + start + 4] = bytes.fromhex("0000c07f")     # float32 NaN
    path.write_bytes(bytes(data))


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill the file system holding ``disk`` with one file until at most ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "ab") as f:
        while shutil.disk_usage(disk).free > leave:
            try:
                f.write(b"\0" * min(1 << 16, max(shutil.disk_usage(disk).free - leave, 4096)))
                f.flush()
            except OSError:
                break
    return filler


CASES = ("lost_index", "users_folder", "symlinks", "nan_memory", "malformed_page", "full_disk", "immutable",
         "forget", "names", "repair_time")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose personal_vlm_node to run (default: this script's)")
    parser.add_argument("--only", nargs="*", choices=CASES, default=None)
    parser.add_argument("--repair-concepts", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="store-cases-") as scratch:
        cases = Cases(Path(scratch), args.code.resolve())
        for name in args.only or CASES:
            try:
                if name == "repair_time":
                    cases.repair_time(args.repair_concepts)
                else:
                    getattr(cases, name)()
            except Exception as e:  # a case that cannot even run is a failure of that case
                cases.results.append((name, "FAILED", f"could not run: {str(e).strip().splitlines()[-1][:160]}"))
    width = max(len(case) for case, _, _ in cases.results)
    for case, result, detail in cases.results:
        print(f"{case:<{width}}  {result:<7} {' | '.join(detail.splitlines())}")
    failed = sum(result == "FAILED" for _, result, _ in cases.results)
    print(f"{len(cases.results) - failed} held, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
