"""Sliding-window next-token datasets and the train/val DataLoaders built from them."""
from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler



def ignore_ctrl_c(worker_id: int) -> None:
    """Loader workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
    main process, not a dying worker, decides to stop at a step boundary (training/stop.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

class GPTDataset(Dataset):
    """Overlapping windows over a token stream; item i is (inputs, targets), targets shifted by one.

    Window starts are 0, stride, 2*stride, ... as long as a full window plus its one-token-ahead
    target fits: `len(token_ids) - context_length` must be positive. Windows are sliced on the fly
    from one tensor, so memory stays at one copy of the token stream - or none, for a NumPy
    (memory-mapped) array, which is kept as it is.
    """

    def __init__(self, token_ids, context_length: int, stride: int):
        if context_length < 1 or stride < 1:
            raise ValueError(f"context_length and stride must be positive, got {context_length} and {stride}")
        self.tokens = token_ids if isinstance(token_ids, np.ndarray) else torch.as_tensor(token_ids, dtype=torch.long)
        if self.tokens.ndim != 1:
            raise ValueError(f"token_ids must be a 1-D sequence, got shape {tuple(self.tokens.shape)}")
        if len(self.tokens) <= context_length:
            raise ValueError(
                f"text too short: {len(self.tokens)} tokens, but one window of context_length "
                f"{context_length} needs at least {context_length + 1} (inputs plus the next-token target)")
        self.context_length = context_length
        self.stride = stride
        self.starts = range(0, len(self.tokens) - context_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        chunk = self.tokens[s: s + self.context_length + 1]  # (T+1,)
        if isinstance(chunk, np.ndarray):                     # memmap: read just this window
            chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:-1], chunk[1:]                          # (T,), (T,)


class RankStridedBatches(Sampler):
    """Every `world_size`-th batch of `batches`, starting at `rank`.

    All processes draw the same (seeded) order, so together they cover each epoch exactly once.
    The epoch's last len % world_size batches are dropped: every process must take the same number
    of steps, or the one with an extra backward would wait forever for the others' gradients.
    """

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches) // self.world_size

    def __iter__(self):
        n = len(self) * self.world_size
        for i, batch in enumerate(self.batches):
            if i >= n:
                break
            if i % self.world_size == self.rank:
                yield batch


def create_token_dataloaders(tokens, batch_size: int = 4, context_length: int = 256, stride: int | None = None,
                             train_ratio: float = 0.9, num_workers: int = 0, seed: int = 123,
                             shard: tuple[int, int] = (0, 1)) -> tuple[DataLoader, DataLoader]:
    """Like create_dataloaders, for an already tokenized (e.g. memory-mapped) corpus: the split is
    by tokens, the first `train_ratio` of them for training."""
    split = int(train_ratio * len(tokens))
    parts = {"train": tokens[:split], "val": tokens[split:]}
    return _loaders(parts, batch_size, context_length, stride or context_length, num_workers, seed,
                    {name: f"{len(part)} tokens" for name, part in parts.items()}, shard)


def _loaders(parts: dict, batch_size, context_length, stride, num_workers, seed, descriptions: dict,
             shard: tuple[int, int] = (0, 1)):
    datasets = {}
    for name, ids in parts.items():
        try:
            datasets[name] = GPTDataset(ids, context_length, stride)
        except ValueError as err:
            raise ValueError(f"{name} split ({descriptions[name]}): {err}; use a longer text, a smaller context "
                             "length or another train_ratio") from None
    if len(datasets["train"]) < batch_size:
        raise ValueError(f"the train split has {len(datasets['train'])} windows, fewer than batch_size "
                         f"{batch_size}; with drop_last that is an empty epoch - lower the batch size, "
                         "context length or stride")
    generator = torch.Generator().manual_seed(seed)
    rank, world_size = shard
    if world_size == 1:
        train = DataLoader(datasets["train"], batch_size=batch_size, shuffle=True, drop_last=True,
                           num_workers=num_workers, generator=generator, worker_init_fn=ignore_ctrl_c)
    else:   # the same shuffled batches as above, every world_size-th of them for this rank
        batches = BatchSampler(RandomSampler(datasets["train"], generator=generator), batch_size, drop_last=True)
        if len(batches) < world_size:
            raise ValueError(f"the train split has {len(batches)} batches, fewer than the {world_size} processes")
        train = DataLoader(datasets["train"], batch_sampler=RankStridedBatches(batches, rank, world_size),
                           num_workers=num_workers, generator=generator, worker_init_fn=ignore_ctrl_c)
    val = DataLoader(datasets["val"], batch_size=batch_size, shuffle=False, drop_last=False,
                     num_workers=num_workers, worker_init_fn=ignore_ctrl_c)
    return train, val


def create_dataloaders(text: str, tokenizer, batch_size: int = 4, context_length: int = 256,
                       stride: int | None = None, train_ratio: float = 0.9, num_workers: int = 0,
                       seed: int = 123, shard: tuple[int, int] = (0, 1)) -> tuple[DataLoader, DataLoader]:
    """Split `text` by characters into train/val, tokenize each, and wrap them in DataLoaders.

    Train: shuffled (seeded) and drop_last; validation: neither. `stride` defaults to
    `context_length` (no overlap, so no window is seen twice per epoch). `shard` = (rank,
    world_size): with several training processes each one's train loader yields its share of the
    same shuffled batches (see RankStridedBatches).
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    stride = stride or context_length
    split = int(train_ratio * len(text))
    parts = {"train": text[:split], "val": text[split:]}
    ids = {name: tokenizer.encode(part) for name, part in parts.items()}
    return _loaders(ids, batch_size, context_length, stride, num_workers, seed,
                    {name: f"{len(part)} characters" for name, part in parts.items()}, shard)
