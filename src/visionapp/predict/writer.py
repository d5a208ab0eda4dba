"""Where the rows go: each rank appends to its own shard as each batch ends (flushed, so a crash loses at most the
batch in flight); at the end rank 0 merges the shards into the output, sorted by path, each image once. What is
in the output, its shards and its errors file is done: running the same command again skips it."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from visionapp.errors import UserError
from visionapp.predict.module import Scores

ERROR_HEADER = ["path", "error"]


def header(topk: int, ood: bool = False) -> list[str]:
    """path, the top-k classes and probabilities, and with an OOD record in the bundle its score and flag."""
    columns = ["path", *(f"{kind}_{j}" for j in range(1, topk + 1) for kind in ("class", "probability"))]
    return columns + (["ood_score", "ood"] if ood else [])


@dataclass(frozen=True)
class Output:
    """predictions.csv, its errors file (predictions.errors.csv) and the ranks' shards beside them."""

    path: Path

    @property
    def errors(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.errors.csv")

    def shard(self, rank: int, errors: bool = False) -> Path:
        return self.path.with_name(f".{(self.errors if errors else self.path).name}.rank{rank}")

    def shards(self, errors: bool = False) -> list[Path]:
        base = self.errors if errors else self.path
        return sorted(self.path.parent.glob(f".{base.name}.rank*"))

    @property
    def lock(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def writing(self) -> Iterator[None]:
        """This process is the one writer of the output while inside: a lock file beside it (its pid, host and
        command), taken over when the process that left it is gone, removed on the way out. A second run on the
        same output is refused with one line naming the first."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = _read_lock(self.lock)
                if holder and holder.get("host") == me["host"] and _alive(int(holder.get("pid", 0))):
                    raise UserError(
                        f"{self.path} is being written by process {holder['pid']} ({holder.get('command', '?')}); "
                        f"wait for it, or pass another --out (lock: {self.lock})"
                    ) from None
                if holder and holder.get("host") != me["host"]:
                    where = f"{holder.get('host')} (process {holder.get('pid')})"
                    raise UserError(f"{self.path} is being written from {where}; if that run is gone, delete "
                                    f"{self.lock}") from None  # fmt: skip
                self.lock.unlink(missing_ok=True)  # its process is gone: taken over
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield
        finally:
            if (_read_lock(self.lock) or {}).get("pid") == me["pid"]:
                self.lock.unlink(missing_ok=True)

    def forget_errors(self) -> int:
        """--retry-errors: the files in the errors file (and its shards) become files to score again; how many."""
        paths = [self.errors, *self.shards(errors=True)]
        count = sum(1 for p in paths for _ in _rows(p, ERROR_HEADER))
        for p in paths:
            p.unlink(missing_ok=True)
        return count

    def done(self, topk: int, ood: bool = False) -> set[str]:
        """The paths already scored or listed as errors, by this output or a run that stopped before merging."""
        expected = header(topk, ood)
        seen: set[str] = set()
        for path in [self.path, *self.shards()]:
            for row in _rows(path, expected):
                seen.add(row[0])
        for path in [self.errors, *self.shards(errors=True)]:
            seen.update(row[0] for row in _rows(path, ERROR_HEADER))
        return seen

    def merge(self, topk: int, ood: bool = False) -> tuple[int, int]:
        """The output and the errors file rewritten whole from themselves and every shard: sorted by path, each
        path once; then the shards go. The numbers of rows and of errors."""
        counts = []
        for target, shards, head in ((self.path, self.shards(), header(topk, ood)),
                                     (self.errors, self.shards(errors=True), ERROR_HEADER)):  # fmt: skip
            rows = {row[0]: row for path in (target, *shards) for row in _rows(path, head)}
            if rows or target.exists():
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                with tmp.open("w", newline="") as f:
                    csv.writer(f).writerows([head, *(rows[p] for p in sorted(rows))])
                os.replace(tmp, target)
            for shard in shards:
                shard.unlink()
            counts.append(len(rows))
        return counts[0], counts[1]


def open_for_append(path: Path, head: list[str]) -> tuple[TextIO, Any]:
    """A CSV file opened to append rows to, and its writer; a new file gets `head` first."""
    new = not path.exists()
    f = path.open("a", newline="")
    writer = csv.writer(f)
    if new:
        writer.writerow(head)
    return f, writer


def _rows(path: Path, expected: list[str]) -> Iterator[list[str]]:
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is not None and first != expected:
            raise UserError(
                f"{path} has the columns {', '.join(first[:5])}...: written with another --topk, another run's bundle "
                f"or by something else; give another --out, or the same --topk and run as before"
            )
        yield from (row for row in reader if row)


class RowWriter(BasePredictionWriter):
    """One CSV row per image: its path relative to the folder, then the top-k classes and their calibrated
    probabilities, and the out-of-distribution score and flag when the bundle has them. Unreadable files go to the
    errors file with the reason (with strict, they stop the run)."""

    def __init__(
        self, output: Output, files: list[str], class_names: list[str], topk: int, strict: bool, ood: bool = False
    ) -> None:
        super().__init__(write_interval="batch")
        self.output, self.files, self.class_names, self.topk, self.strict = output, files, class_names, topk, strict
        self.ood = ood
        self._open: list[TextIO] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        rank = trainer.global_rank
        self.rows = self._writer(self.output.shard(rank), header(self.topk, self.ood))
        self.errors = self._writer(self.output.shard(rank, errors=True), ERROR_HEADER)

    def _writer(self, path: Path, head: list[str]) -> Any:
        f, writer = open_for_append(path, head)
        self._open.append(f)
        return writer

    def write_on_batch_end(self, trainer, pl_module, prediction: Scores, batch_indices, batch, batch_idx, dl_idx):
        for i, why in prediction.failures:
            if self.strict:
                raise UserError(f"{self.files[i]} cannot be read as an image ({why}); --strict stops here")
            self.errors.writerow([self.files[i], why])
        ood: list[list[str]] = [[] for _ in prediction.indices]
        if prediction.ood_scores is not None and prediction.ood_flags is not None:
            pairs = zip(prediction.ood_scores.tolist(), prediction.ood_flags.tolist(), strict=True)
            ood = [[f"{score:.4f}", str(flag).lower()] for score, flag in pairs]
        for i, p, c, o in zip(prediction.indices, prediction.probabilities.tolist(), prediction.classes.tolist(), ood,
                              strict=True):  # fmt: skip
            self.rows.writerow([self.files[i], *(v for j in range(self.topk)
                                                 for v in (self.class_names[c[j]], f"{p[j]:.6f}")), *o])  # fmt: skip
        for f in self._open:
            f.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for f in self._open:
            f.close()
        self._open.clear()


class Progress(L.Callback):
    """Images scored, images/s and the time left, every few seconds: on one line in a terminal, as plain lines in
    a log (rank 0 speaks for all: the ranks go at the same pace)."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        self.total, self.every, self.done = total, every, 0
        self.tty = sys.stdout.isatty()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs: Scores, batch, batch_idx, dataloader_idx=0) -> None:
        self.done += (len(outputs.indices) + len(outputs.failures)) * trainer.world_size
        now = time.perf_counter()
        if trainer.is_global_zero and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            line = (f"scored {min(self.done, self.total):,}/{self.total:,} images, {rate:,.1f} images/s, "
                    f"{time.strftime('%H:%M:%S', time.gmtime(left))} left")  # fmt: skip
            print(f"\r{line}   " if self.tty else line, end="" if self.tty else "\n", flush=True)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.tty and trainer.is_global_zero:
            print(flush=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # gone, or half-written by a process that died writing it
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
