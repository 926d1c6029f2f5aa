"""A deterministic, shuffling, multi-epoch batch iterator on Grain, sharded per host, checkpointable.

The order is defined once for all hosts as an endless "global stream" of example indices:
epoch e is a permutation of range(n) drawn from (seed, e), optionally sorted by a curriculum
rank with shuffling only among equal ranks. Global batch b is stream positions
[b*G, (b+1)*G) for the global batch size G, and host h of P reads rows [h*G/P, (h+1)*G/P) of it.
So each global batch is the same whatever the host count, the hosts' batches are disjoint and
together cover it, and a batch may straddle an epoch boundary (epochs never get a short batch).

The position is Grain's batch counter; `get_state()` returns it (plus the settings it is only
valid for) as a JSON-serializable dict for the checkpoint, and `set_state()` restores it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from g2rpo_jax.data.example import Example

STATE_VERSION = 1


def epoch_order(
    num_examples: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    ranks: Sequence[int] | None = None,
) -> np.ndarray:
    """Example indices in the order epoch `epoch` visits them.

    With `ranks` (a curriculum), indices are sorted by rank, ascending (easy first); `shuffle`
    then only permutes indices that share a rank.
    """
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)  # [N]
    else:
        order = np.arange(num_examples)  # [N]
    if ranks is not None:
        ranks_array = np.asarray(ranks)
        order = order[np.argsort(ranks_array[order], kind="stable")]
    return order


def curriculum_ranks(
    examples: Sequence[Example], key: str, order: Sequence[Any] = ()
) -> list[int]:
    """Rank of each example under a curriculum key: 'source', 'difficulty', or a metadata field.

    With `order` (values easiest first, e.g. ('gsm8k', 'math', 'aime')), rank is the position in
    it; without, values are ranked by their natural sort order.
    """
    def value_of(example: Example) -> Any:
        if key in ("source", "difficulty"):
            return getattr(example, key)
        if key not in example.metadata:
            raise ValueError(
                f"curriculum_key={key!r}: example {example.id!r} has no such metadata field; use "
                f"'source', 'difficulty' or one of its metadata keys {sorted(example.metadata)}"
            )
        return example.metadata[key]

    values = [value_of(e) for e in examples]
    if any(v is None for v in values):
        missing = next(e.id for e, v in zip(examples, values) if v is None)
        raise ValueError(f"curriculum_key={key!r}: example {missing!r} has no value for it")
    if order:
        position = {value: rank for rank, value in enumerate(order)}
        unknown = sorted({str(v) for v in values if v not in position})
        if unknown:
            raise ValueError(
                f"curriculum_order={tuple(order)!r} does not list the {key!r} values {unknown}"
            )
        return [position[v] for v in values]
    distinct = sorted(set(values))
    position = {value: rank for rank, value in enumerate(distinct)}
    return [position[v] for v in values]


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazy: only needed when the caller does not say which host this is

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r}, process_count={process_count!r}: need "
            "process_count >= 1 and 0 <= process_index < process_count"
        )
    return process_index, process_count


class _StreamIndex:
    """host row j -> example index; caches the orders of the epochs it touched last."""

    def __init__(self, num_examples, seed, shuffle, ranks, global_batch_size, host_batch_size, process_index):
        self._num_examples = num_examples
        self._seed = seed
        self._shuffle = shuffle
        self._ranks = ranks
        self._global_batch_size = global_batch_size
        self._host_batch_size = host_batch_size
        self._process_index = process_index
        self._orders: dict[int, np.ndarray] = {}

    def global_position(self, host_row: int) -> int:
        batch, row = divmod(host_row, self._host_batch_size)
        return batch * self._global_batch_size + self._process_index * self._host_batch_size + row

    def __call__(self, host_row: int) -> int:
        epoch, position = divmod(self.global_position(host_row), self._num_examples)
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs at a time
                del self._orders[min(self._orders)]
            self._orders[epoch] = epoch_order(
                self._num_examples, epoch, self._seed, self._shuffle, self._ranks
            )
        return int(self._orders[epoch][position])


class BatchIterator:
    """Endless iterator of per-host batches: lists of `items[i]` (pass range(n) to get indices).

    Attributes: `epoch` is the epoch of the next element to be read, `step` the number of batches
    already yielded (global, the same on every host).
    """

    def __init__(
        self,
        items: Sequence[Any],
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        ranks: Sequence[int] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        num_examples = len(items)
        if num_examples == 0:
            raise ValueError("items is empty: there is nothing to iterate over")
        process_index, process_count = _default_process(process_index, process_count)
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size!r} must be positive and divisible by "
                f"process_count={process_count}"
            )
        if ranks is not None and len(ranks) != num_examples:
            raise ValueError(f"ranks has {len(ranks)} entries for {num_examples} items")
        self._items = items
        self._num_examples = num_examples
        self._global_batch_size = global_batch_size
        self._host_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        # Only settings that change the global order are part of the state's identity; the host
        # count is not, so a run may resume on a different number of hosts.
        self._identity = {
            "num_examples": num_examples,
            "global_batch_size": global_batch_size,
            "seed": int(seed),
            "shuffle": bool(shuffle),
            "curriculum": None if ranks is None else _ranks_digest(ranks),
        }
        self._stream = _StreamIndex(
            num_examples, int(seed), bool(shuffle),
            None if ranks is None else np.asarray(ranks), global_batch_size,
            self._host_batch_size, process_index,
        )
        self._grain_iterator = self._build_grain_iterator()

    def _build_grain_iterator(self):
        import grain  # lazy: keeps `import g2rpo_jax.data` light

        element: Callable[[int], Any] = lambda row: self._items[self._stream(row)]
        dataset = (
            grain.MapDataset.range(sys.maxsize)  # host rows, endless
            .map(element)
            .batch(self._host_batch_size, batch_fn=list)
        )
        # Reading is cheap indexing: no worker threads, no prefetch buffer to checkpoint.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        return iter(dataset.to_iter_dataset(options))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list[Any]:
        return next(self._grain_iterator)

    @property
    def step(self) -> int:
        return int(self._grain_iterator.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        return self.step * self._global_batch_size // self._num_examples

    @property
    def global_batch_size(self) -> int:
        return self._global_batch_size

    @property
    def host_batch_size(self) -> int:
        return self._host_batch_size

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position (for the checkpoint)."""
        return {
            "version": STATE_VERSION,
            "grain": dict(self._grain_iterator.get_state()),
            "epoch": self.epoch,  # informational
            **self._identity,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes from `get_state()` output; refuses a state saved under another order."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version={state.get('version')!r}; this code reads version {STATE_VERSION}")
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"iterator state was saved with {key}={state.get(key)!r} but this iterator has "
                    f"{key}={value!r}; the saved position does not apply to this order"
                )
        self._grain_iterator.set_state(dict(state["grain"]))


def _ranks_digest(ranks: Sequence[int]) -> str:
    """A short fingerprint of the curriculum, so a state is not resumed under another one."""
    import hashlib

    return hashlib.sha256(np.asarray(ranks, dtype=np.int64).tobytes()).hexdigest()[:16]
