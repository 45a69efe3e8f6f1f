"""A Ray Train dataset shard as the re-iterable torch dataset Lightning loops over (imported by training workers
only: the dataset's own processes unpickle :mod:`viscy.train.datasource`, which does not import torch)."""

from __future__ import annotations

import threading
from typing import Any

import torch


class RayShardIterable(torch.utils.data.IterableDataset):
    """Re-iterable view of a Ray Train dataset shard: each ``iter`` is one pass (one epoch) of torch batches.

    With ``cache``, the first complete pass is kept and replayed (fixed validation crops are read once, not
    every epoch). :meth:`start_next_pass` starts the next pass's execution in the background (called when a
    training epoch's batches are done, so the next epoch's first batch is read during validation).
    """

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int = 0, cache: bool = False) -> None:
        self.shard, self.batch_size, self.shuffle_buffer, self.cache = shard, batch_size, shuffle_buffer, cache
        self._cached: list[Any] | None = None
        self._next: tuple[threading.Thread, dict[str, Any]] | None = None

    def _batches(self):
        return self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            dtypes=torch.float32,
        )

    def start_next_pass(self) -> None:
        """Start the next pass and fetch its first batch in a background thread (no-op once cached)."""
        if self._cached is not None or self._next is not None:
            return
        started: dict[str, Any] = {}

        def fetch() -> None:
            try:
                started["batches"] = iter(self._batches())
                started["first"] = next(started["batches"])
            except BaseException as exc:  # StopIteration included: re-raised where the pass is consumed
                started["error"] = exc

        thread = threading.Thread(target=fetch, name="viscy-next-pass", daemon=True)
        thread.start()
        self._next = (thread, started)

    def _pass(self):
        if self._next is None:
            yield from self._batches()
            return
        thread, started = self._next
        self._next = None
        thread.join()
        if isinstance(started.get("error"), StopIteration):
            return
        if "error" in started:
            raise started["error"]
        yield started["first"]
        yield from started["batches"]

    def __iter__(self):
        if self._cached is not None:
            yield from self._cached
            return
        kept: list[Any] = []
        for batch in self._pass():
            if self.cache:
                kept.append(batch)
            yield batch
        if self.cache:
            self._cached = kept
