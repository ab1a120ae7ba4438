"""Sequences for training: packed (or padded) examples, sharded over data-parallel ranks, with
a position that survives a resume on a different world size.

Packing concatenates whole examples into seq_len rows and restarts `position_ids` at every
document; transformers (masking_utils.find_packed_sequence_indices) turns restarting position
ids into a block-causal mask when no attention_mask is given, so documents never attend to
each other. Without packing each example is one row, right-padded, with an attention mask.

The order is a pure function of (seed, epoch): every rank builds the same global list of rows
and takes its slice of each global micro-batch, so the position is just (epoch, rows consumed),
independent of the number of ranks.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from moe_dist.data.dataset import IGNORE_INDEX


@dataclass
class DataPosition:
    epoch: int = 0
    rows_consumed: int = 0  # global rows of this epoch already trained on


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict]:
    """Greedy in-order packing: a row is closed when the next example does not fit."""
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def close() -> None:
        pad = seq_len - len(ids)
        # The pad tail is its own document (positions restart), so it attends to nothing real.
        rows.append({"input_ids": ids + [pad_id] * pad, "labels": labels + [IGNORE_INDEX] * pad,
                     "position_ids": pos + list(range(pad))})

    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > seq_len:
            close()
            ids, labels, pos = [], [], []
        ids, labels, pos = ids + ex_ids, labels + ex_labels, pos + list(range(len(ex_ids)))
    if ids:
        close()
    return rows


def pad_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict]:
    return [{"input_ids": i + [pad_id] * (seq_len - len(i)), "labels": lab + [IGNORE_INDEX] * (seq_len - len(i)),
             "attention_mask": [1] * len(i) + [0] * (seq_len - len(i))} for i, lab in examples]


class ShardedBatches:
    """Micro-batches of this rank, epoch after epoch, in a deterministic global order."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, packing: bool, pad_id: int):
        self.examples, self.seq_len, self.micro_batch = examples, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.packing, self.pad_id = dp_rank, dp_size, seed, packing, pad_id
        self.position = DataPosition()
        self._rows = self._epoch_rows(0)
        if len(self._rows) < micro_batch * dp_size:
            raise ValueError(f"{len(self._rows)} training rows per epoch cannot fill one global micro-batch of "
                             f"{micro_batch} x {dp_size} ranks; lower train.micro_batch or add data")

    @property
    def rows_per_epoch(self) -> int:
        return len(self._rows)

    def _epoch_rows(self, epoch: int) -> list[dict]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        shuffled = [self.examples[i] for i in order]
        build = pack_examples if self.packing else pad_examples
        return build(shuffled, self.seq_len, self.pad_id)

    def next_batch(self) -> dict[str, torch.Tensor]:
        step_rows = self.micro_batch * self.dp_size
        if self.position.rows_consumed + step_rows > len(self._rows):  # drop the ragged tail
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._rows = self._epoch_rows(self.position.epoch)
        lo = self.position.rows_consumed + self.dp_rank * self.micro_batch
        mine = self._rows[lo: lo + self.micro_batch]
        self.position.rows_consumed += step_rows
        return {k: torch.tensor([r[k] for r in mine], device="cpu") for k in mine[0]}

    def state_dict(self) -> dict:
        return asdict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition(**state)
        self._rows = self._epoch_rows(self.position.epoch)
