"""Streaming torch dataset of document-learning samples (no files written).

Notable:
- Yields the same records as the JSONL writer, except `images` holds the corrupted `PIL.Image`s themselves:
  `{"id", "images": [PIL.Image], "messages", "meta"}`; the processor turns them into model inputs.
- Jobs (synthetic page indices, PDF files, JSONL lines) are dealt round-robin over `world_size` ranks x DataLoader
  workers, so each sample is produced exactly once per pass; a sample depends only on (seed, page), so the
  stream's content does not depend on the worker count (only the interleaving does).
- `Source(endless=True)` gives an endless synthetic stream; `epoch` changes the seed so passes differ.
- Skipped inputs are counted in `self.skipped` of each worker copy and never yielded.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import torch

from vlmcook.data.docs.corrupt import CorruptConfig
from vlmcook.data.docs.pipeline import Source
from vlmcook.data.docs.samples import SampleConfig, make_sample


class DocStream(torch.utils.data.IterableDataset):
    def __init__(self, source: Source, seed: int = 0, corrupt: CorruptConfig = CorruptConfig(),
                 sample: SampleConfig = SampleConfig(), rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.source, self.seed, self.corrupt, self.sample = source, seed, corrupt, sample
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.skipped: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        shards, shard = self.world_size * nw, self.rank * nw + wid
        seed = self.seed + 1_000_003 * self.epoch
        for job in islice(self.source.jobs(), shard, None, shards):
            for page, skip in self.source.pages(job, seed):
                if page is None:
                    self.skipped.append(skip)
                    continue
                record, cor = make_sample(page, seed, self.corrupt, self.sample)
                yield {"id": record["id"], "images": [cor.image], "messages": record["messages"],
                       "meta": record["meta"]}
