"""A function over items, computed by worker processes, its results in the items' order.

Used where the work is a simulator's (stepping, rendering: one MuJoCo process a core) and the results go
into one dataset in a fixed order, so that the dataset does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_END = object()


def in_order(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, *,
             initializer: Callable[..., None] | None = None, initargs: tuple = (), ahead: int = 2) -> Iterator[Any]:
    """fn(item) for each item, in the order of `items`, computed by `workers` spawned processes with `ahead`
    items a worker in flight. `items` is consumed lazily (it may be endless: stop iterating when you have
    enough); `fn`, `initializer` and their arguments must pickle. A worker's exception is raised here, at its
    item, after the results before it; closing the iterator cancels the items not started."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers = {workers!r} is invalid: expected an int >= 1")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        pending: deque = deque()
        queue = iter(items)
        try:
            while True:
                while len(pending) < ahead * workers:
                    item = next(queue, _END)
                    if item is _END:
                        break
                    pending.append(pool.submit(fn, item))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
