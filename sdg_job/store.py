"""The run directory on disk: shard files committed atomically, the index of what is committed, the final merge.

A shard is complete when its `.json` summary exists; it is written (atomically) only after the shard's records
and their digests are on disk, so a crash at any moment leaves each shard complete or absent.

The driver's memory does not grow with the records: it holds each committed shard's summary and 16 bytes per
record (a digest, for exact-duplicate removal); records stay on disk and the merge streams them.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdg_job import near_dupes
from sdg_job.errors import JobError, RecipeError
from sdg_job.summary import ShardSummary

DIGEST_SIZE = 16
DATA_SUFFIXES = (".jsonl", ".digests", ".tokens", ".minhash")  # a shard attempt's files, beside its summary (.json)
TOKEN_COUNT = np.dtype("<u4")  # a record's tokens (sdg_job.tokens), in a shard's .tokens file
IDENTITY_FILE = "run.json"  # the recipe hash the run dir's shards were made by
WRITTEN_FILE = "outputs.json"  # the files beside the output that this run dir's merges wrote (sdg_job.outputs)


def synced_temp(path: Path, data: bytes) -> Path:
    """`data` in a temp file beside `path`, fsynced: ready to be renamed or linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically: a synced temp file renamed over it, then the directory fsynced."""
    tmp = synced_temp(path, data.encode() if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def publish_once(path: Path, text: str) -> bool:
    """Put `text` at `path` atomically unless something is there already; True if this call put it there. A hard
    link of a complete temp file, which fails if `path` exists (Lustre, NFS, GPFS, local filesystems all have
    them); where links are not supported, a rename after a check, which two writers could both pass."""
    tmp = synced_temp(path, text.encode())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def record_digest(record: dict) -> bytes:
    """What makes two records the same, in 16 bytes: the driver dedups millions of records by these, never by
    their text (2^-128 per pair: no collision in any dataset this job will make)."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.blake2b(canonical, digest_size=DIGEST_SIZE).digest()


class RunStore:
    def __init__(self, run_dir: Path, near_threshold: float | None = None):
        self.run_dir = run_dir
        self.near_threshold = near_threshold  # quality.near_duplicates: None, or a Jaccard similarity
        self.shards_dir = run_dir / "shards"
        self.logs_dir = run_dir / "logs"
        self.summaries: dict[str, ShardSummary] = {}  # committed shards, by id
        self._digests: dict[str, bytes] = {}  # their records' digests, DIGEST_SIZE bytes each, in file order
        self._tokens: dict[str, bytes] = {}  # their records' token counts (TOKEN_COUNT), where the shard counted them
        self._bands: dict[str, np.ndarray] = {}  # their records' LSH band hashes, with near_threshold
        # Their summaries' counts summed (requested, valid, output_tokens): the progress line reads them every turn.
        self.totals: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # their dropped records summed by reason
        self._last_selection: tuple[Any, Any] = (None, None)  # (shards and limit, their selection)

    def open(self, recipe_hash: str, fresh: bool, source: str, keep: tuple[str, ...] = ()) -> None:
        """Claim the run dir for this recipe; refuse one made by a different recipe unless `fresh`, which wipes
        it all but `keep` (the lease this driver holds: wiping it would let a second driver in) and the list of
        files its merges wrote (they stay the job's to replace)."""
        identity = self.run_dir / IDENTITY_FILE
        if identity.exists() and not fresh:
            old = json.loads(identity.read_text()).get("recipe_sha256")
            if old != recipe_hash:
                raise RecipeError(
                    source,
                    "",
                    f"{self.run_dir} holds shards of a different recipe (sha256 {old[:12]}…, now {recipe_hash[:12]}…). "
                    "Re-run with --fresh to discard them, or set a different output_path.",
                )
        if fresh:
            self.summaries.clear()
            self._digests.clear()
            self._tokens.clear()
            self._bands.clear()
            self.totals.clear()
            self.dropped.clear()
            self._last_selection = (None, None)
        if fresh and self.run_dir.exists():
            for path in self.run_dir.iterdir():
                if path.name in keep or path.name == WRITTEN_FILE:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if not identity.exists():
            atomic_write(identity, json.dumps({"recipe_sha256": recipe_hash}) + "\n")

    def summary_path(self, shard_id: str) -> Path:
        return self.shards_dir / f"{shard_id}.json"

    def commit(
        self,
        shard_id: str,
        records: list[dict],
        summary: ShardSummary,
        tokens: list[int] | None = None,
        signatures: np.ndarray | None = None,
    ) -> ShardSummary:
        """Called where the shard ran; returns the shard's summary as committed. The records, their digests (and
        token counts) go under names of this attempt's own; the summary, put in place last, names them (`files`)
        and marks the shard complete, once: if another attempt committed it first (a retry while a worker thought
        lost still ran), that one stays, and this attempt's files are removed. A committed shard never changes."""
        files = f"{shard_id}.{secrets.token_hex(4)}"
        summary = summary.model_copy(update={"files": files})
        atomic_write(self.shards_dir / f"{files}.jsonl", jsonl(records))
        atomic_write(self.shards_dir / f"{files}.digests", b"".join(record_digest(r) for r in records))
        if tokens is not None and len(tokens) == len(records):
            atomic_write(self.shards_dir / f"{files}.tokens", np.asarray(tokens, dtype=TOKEN_COUNT).tobytes())
        if signatures is not None:
            atomic_write(self.shards_dir / f"{files}.minhash", signatures.astype(near_dupes.SIGNATURE).tobytes())
        if publish_once(self.summary_path(shard_id), summary.to_json()):
            return summary
        for suffix in DATA_SUFFIXES:
            (self.shards_dir / f"{files}{suffix}").unlink(missing_ok=True)
        return self.committed(shard_id) or summary

    def committed(self, shard_id: str) -> ShardSummary | None:
        """The summary of a shard committed on disk, or None. Every read of a shard file is this one."""
        try:
            return ShardSummary.from_json(self.summary_path(shard_id).read_text())
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        """Remove what no committed shard names: files of attempts that crashed before committing (or lost to
        another), temp files. Only safe when no attempt of this run is still running: after the job's end."""
        named = {summary.files for summary in self.summaries.values()}
        swept = 0
        for path in self.shards_dir.iterdir():
            orphan = path.suffix in DATA_SUFFIXES and path.stem not in named
            if orphan or (path.name.startswith(".") and path.suffix.startswith(".tmp")):
                path.unlink(missing_ok=True)
                swept += 1
        return swept

    def records_path(self, summary: ShardSummary) -> Path:
        return self.shards_dir / f"{summary.files}.jsonl"

    def records(self, shard_id: str) -> list[dict]:
        """A committed shard's records."""
        summary = self.committed(shard_id)
        if summary is None:
            raise JobError(f"{shard_id} is not committed in {self.shards_dir}")
        path = self.records_path(summary)
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    # ------------------------------------------------------------ the index of committed shards (driver side)

    def load_committed(self) -> dict[str, ShardSummary]:
        """Index every shard complete on disk (a resumed run, or shards that committed while being abandoned);
        returns the summaries by shard id, in id order."""
        for path in sorted(self.shards_dir.glob("shard-*.json")):
            if path.stem not in self.summaries and (summary := self.committed(path.stem)) is not None:
                self.note_committed(path.stem, summary)
        return self.summaries

    def note_committed(self, shard_id: str, summary: ShardSummary) -> None:
        digests = (self.shards_dir / f"{summary.files}.digests").read_bytes()  # first: a failure here adds nothing
        self._digests[shard_id] = digests
        tokens = self.shards_dir / f"{summary.files}.tokens"
        if tokens.exists():
            self._tokens[shard_id] = tokens.read_bytes()
        if self.near_threshold is not None:
            sigs = self._signatures(summary).reshape(-1, near_dupes.NUM_PERM)
            self._bands[shard_id] = near_dupes.bands(sigs, self.near_threshold)
        self.summaries[shard_id] = summary
        self.totals.update(requested=summary.requested, valid=summary.valid, output_tokens=summary.output_tokens)
        self.dropped.update(summary.dropped)

    def selection(self, shard_ids: list[str], limit: int) -> tuple[np.ndarray, Counter[str]]:
        """Which records of these committed shards, read in this order, make the output: the first copy of each
        (and with near_threshold, none near an earlier record), up to `limit`. Returns a mask over their records
        and how many were passed over before the cut, by reason.
        The last answer is kept: a job's end asks it three times (last top-up check, merge, manifest), and a
        committed shard never changes, so the same shards and limit give the same answer."""
        key = (tuple(shard_ids), limit)
        if self._last_selection[0] != key:
            self._last_selection = (key, self._select(shard_ids, limit))
        return self._last_selection[1]

    def record_tokens(self, shard_ids: list[str], limit: int) -> np.ndarray | None:
        """The token counts of exactly the records `selection` picks, or None unless every shard counted them."""
        if not shard_ids or any(i not in self._tokens for i in shard_ids):
            return None
        keep, _ = self.selection(shard_ids, limit)
        return np.frombuffer(b"".join(self._tokens[i] for i in shard_ids), dtype=TOKEN_COUNT)[keep]

    def _select(self, shard_ids: list[str], limit: int) -> tuple[np.ndarray, Counter[str]]:
        digests = np.frombuffer(b"".join(self._digests[i] for i in shard_ids), dtype=np.dtype((np.void, DIGEST_SIZE)))
        first = np.zeros(len(digests), dtype=bool)
        first[np.unique(digests, return_index=True)[1]] = True
        keep = first.copy()
        if self.near_threshold is not None and len(digests):
            band_hashes = np.concatenate([self._bands[i] for i in shard_ids])
            rows = self._signature_rows(shard_ids)
            keep &= ~near_dupes.near_duplicates(band_hashes, first, rows, self.near_threshold)
        kept = np.flatnonzero(keep)
        cut = len(digests)  # the records read before the output is full
        if len(kept) > limit:
            cut = int(kept[limit - 1]) + 1
            keep[cut:] = False
        passed = Counter(duplicate=int((~first[:cut]).sum()), near_duplicate=int((first[:cut] & ~keep[:cut]).sum()))
        return keep, +passed  # only the reasons that occurred

    def _signatures(self, summary: ShardSummary) -> np.ndarray:
        path = self.shards_dir / f"{summary.files}.minhash"
        if not path.exists():  # quality.near_duplicates is part of the recipe: its shards all have signatures
            raise JobError(f"{path} is missing: delete {self.summary_path(summary.shard).name} to make the shard again")
        return np.memmap(path, dtype=near_dupes.SIGNATURE, mode="r")

    def _signature_rows(self, shard_ids: list[str]):
        """A reader of the signatures of records by their position among these shards' records (read from disk:
        the driver keeps only their bands)."""
        counts = [len(self._digests[i]) // DIGEST_SIZE for i in shard_ids]
        starts = np.cumsum([0, *counts])

        def rows(positions: np.ndarray) -> np.ndarray:
            out = np.empty((len(positions), near_dupes.NUM_PERM), dtype=near_dupes.SIGNATURE)
            shard_of = np.searchsorted(starts, positions, side="right") - 1
            for k in np.unique(shard_of):
                sigs = self._signatures(self.summaries[shard_ids[k]]).reshape(-1, near_dupes.NUM_PERM)
                mine = shard_of == k
                out[mine] = sigs[positions[mine] - starts[k]]
            return out

        return rows

    def unique_count(self, shard_ids: list[str], limit: int) -> tuple[int, Counter[str]]:
        """(distinct records of these shards, up to `limit`; the records passed over before the cut, by reason:
        duplicate, near_duplicate), as `selection` counts them."""
        keep, passed = self.selection(shard_ids, limit)
        return int(keep.sum()), passed

    def merge(self, shard_ids: list[str], limit: int, outputs: list[Path], per_file: int) -> tuple[int, list[str]]:
        """Stream the selected records' lines, as written, into `outputs` (`per_file` records each): all are
        written and fsynced under temp names first, then renamed into place. Returns how many were written, and
        the shards they came from."""
        keep, _ = self.selection(shard_ids, limit)
        used: list[str] = []
        lines = self._selected_lines(shard_ids, keep, used)
        written, temps = 0, []
        try:
            for path in outputs:
                path.parent.mkdir(parents=True, exist_ok=True)
                for left in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):  # by a merge that crashed
                    left.unlink()
                temps.append((temp_beside(path), path))
                with temps[-1][0].open("wb") as f:
                    for line in itertools.islice(lines, per_file):
                        f.write(line)
                        written += 1
                    f.flush()
                    os.fsync(f.fileno())
            for tmp, path in temps:
                os.replace(tmp, path)
        finally:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
        for directory in {path.parent for path in outputs}:
            fsync_dir(directory)
        return written, used

    def _selected_lines(self, shard_ids: list[str], keep: np.ndarray, used: list[str]) -> Iterator[bytes]:
        """One shard in memory at a time; notes in `used` each shard that gives a line."""
        pos = 0
        for shard_id in shard_ids:
            expected = len(self._digests[shard_id]) // DIGEST_SIZE
            path = self.records_path(self.summaries[shard_id])
            with path.open("rb") as f:
                lines = f.readlines()
            if len(lines) != expected:  # only if something outside the job changed the file
                raise JobError(f"{path} has {len(lines)} records and {expected} digests: delete "
                               f"{self.summary_path(shard_id).name} to make the shard again")  # fmt: skip
            mask = keep[pos : pos + expected]
            if mask.any():
                used.append(shard_id)
            yield from itertools.compress(lines, mask)
            pos += expected
