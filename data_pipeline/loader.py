"""grain input pipeline: resume dataset -> shuffled, sharded, padded or packed token batches.

Batches are dicts of int32 arrays [batch, seq_len]:

* ``inputs`` / ``targets``: tokens and next tokens (targets are inputs shifted by one)
* ``loss_mask``: 1 where the target counts in the loss (``loss_on="all"``: every real
  token; ``"history"``: only the work-history entries and the end marker)
* ``segment_ids``: 1, 2, ... per resume within a packed row, 0 on padding
* ``positions``: RoPE position of each token within its resume

Shuffling is by seed (grain's index shuffle: a permutation per epoch), sharding by
process (``process_index::process_count`` of the one global order), so every process
reads a disjoint slice. The iterator's state (``it.get_state()`` / ``it.set_state()``)
is a small dict that checkpoints restore.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from data_pipeline.dataset_dir import DatasetDir

LOSS_ON = ("all", "history")
_FIELDS = ("inputs", "targets", "loss_mask")


def truncation(dataset: DatasetDir, split: str, seq_len: int) -> dict[str, int]:
  """How much of ``split`` rows of ``seq_len`` tokens cut: a resume of N tokens needs
  N - 1 <= seq_len (inputs are tokens[:-1], targets tokens[1:]); an entry is cut when its last
  token falls past that. Returns counts of resumes and entries, total and cut."""
  tokens, entry_ends = dataset.lengths(split)
  limit = seq_len + 1  # tokens a row holds, inputs and targets together
  cut_entries = sum(int((e > limit).sum()) for e in entry_ends)
  return {"resumes": int(len(tokens)), "cut_resumes": int((tokens > limit).sum()),
          "entries": int(sum(len(e) for e in entry_ends)), "cut_entries": cut_entries}


def example(record: dict, seq_len: int, loss_on: str) -> dict[str, np.ndarray]:
  """One resume's row before padding: ``inputs``, ``targets`` (cut to ``seq_len``) and ``loss_mask``."""
  tokens = np.asarray(record["tokens"], np.int32)[: seq_len + 1]  # cut, counted by truncation()
  if loss_on == "history":
    hist = np.zeros(len(record["tokens"]), np.int32)
    hist[int(record["entry_starts"][0]):] = 1
    loss = hist[1: len(tokens)]
  else:
    loss = np.ones(len(tokens) - 1, np.int32)
  return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss}


def _pad(ex: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  n = len(ex["inputs"])
  out = {}
  for k in _FIELDS:
    v = np.full(seq_len, pad_id if k != "loss_mask" else 0, np.int32)
    v[:n] = ex[k]
    out[k] = v
  seg = np.zeros(seq_len, np.int32)
  seg[:n] = 1
  pos = np.zeros(seq_len, np.int32)
  pos[:n] = np.arange(n)
  out["segment_ids"], out["positions"] = seg, pos
  return out


def _rename_packed(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"],
          "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
          "positions": ex["inputs_positions"].astype(np.int32)}


def make_dataset(dataset_dir: str | Path | DatasetDir, split: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, pack: bool = False,
                 loss_on: str = "all", pad_id: int = 0, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The batch pipeline of one process over a ``build_dataset`` output. ``batch_size`` is this
  process's share of the batch.

  ``num_epochs=None`` repeats forever (training); evaluation passes 1. Batches are whole
  (``drop_remainder``): an endless stream drops nothing, and a batch may span two epochs; a finite
  one drops its last ``rows % batch_size`` rows.
  """
  return _rows(dataset_dir, split, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
               num_epochs=num_epochs, pack=pack, loss_on=loss_on, pad_id=pad_id, process_index=process_index,
               process_count=process_count).batch(batch_size, drop_remainder=True)


def rows_per_epoch(dataset_dir: str | Path | DatasetDir, split: str, *, seq_len: int, batch_size: int,
                   seed: int = 0, pack: bool = False, process_count: int = 1) -> int:
  """Rows the training pipeline of :func:`make_dataset` yields per pass over ``split``, all
  ``process_count`` processes together (``batch_size``: one process's share, as there).

  Unpacked, one row per resume: the split's length. Packed, the rows the packer makes of one pass
  (every process's slice packed in its own ``batch_size`` bins, as in training): in the endless
  training stream an epoch's last, partly filled rows are topped up with the next epoch's resumes
  instead, so this counts at most ``batch_size`` rows per process more than a training epoch holds."""
  if not isinstance(dataset_dir, DatasetDir):
    dataset_dir = DatasetDir(dataset_dir)
  if not pack:
    return len(dataset_dir.source(split))
  return sum(sum(1 for _ in _rows(dataset_dir, split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                  num_epochs=1, pack=True, process_index=i, process_count=process_count))
             for i in range(process_count))


def _rows(dataset_dir: str | Path | DatasetDir, split: str, *, seq_len: int, batch_size: int, seed: int = 0,
          shuffle: bool = True, num_epochs: int | None = None, pack: bool = False, loss_on: str = "all",
          pad_id: int = 0, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """:func:`make_dataset` before batching: one process's padded or packed rows."""
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  if not isinstance(dataset_dir, DatasetDir):
    dataset_dir = DatasetDir(dataset_dir)
  ds = grain.MapDataset.source(dataset_dir.source(split))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.map(lambda r: example(r, seq_len, loss_on))
  it = ds.to_iter_dataset()
  if pack:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in _FIELDS}, num_packing_bins=batch_size, seed=seed,
        shuffle_bins=shuffle)
    it = it.map(_rename_packed)
  else:
    it = it.map(lambda ex: _pad(ex, seq_len, pad_id))
  return it
