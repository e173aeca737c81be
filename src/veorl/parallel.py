"""One process-pool driver for simulator and decoding work (collection, source videos, ingestion, evaluation).

    for outcome in run_parallel(work, items, workers, initializer=setup, initargs=(...,)):
        if outcome.died:            # the process running this item died (a segfault, the OOM killer)
            ...outcome.index, outcome.died
        else:
            ...outcome.index, outcome.value

What every caller gets:
- processes are started with "spawn": simulators (EGL/MuJoCo) and decoders are not fork-safe, and a forked copy
  of a lock held by another thread of the parent (boto3, tqdm) would hang the child for good;
- `initializer(*initargs)` runs once per process (build a simulator, load an agent); with `workers <= 1`, or a
  single item, everything runs in this process instead (no start-up cost, and a debugger sees the work), the
  initializer included, and `cleanup()` runs afterwards;
- results are yielded as items finish, in completion order; `Outcome.index` is the item's position;
- an exception raised by `fn` or by the initializer is re-raised here (the same exception type as in-process),
  and the remaining work is cancelled;
- a process that dies does not hang the run or lose other items: the items that were in flight with it are run
  again, one at a time in a fresh process, which tells the culprit apart; only that item is reported with
  `died` set, every other item still yields its value. So `fn` must be safe to run twice for an item (all our
  stages write their outputs atomically under names derived from the item).
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DIED_REASON = "worker process died while running this item (killed, out of memory or crashed in native code)"


@dataclass(frozen=True)
class Outcome(Generic[R]):
    index: int  # position of the item in the `items` given to run_parallel
    value: R | None = None  # what fn returned; None when the worker died
    died: str | None = None  # why there is no value: the process running this item died


def worker_count(workers: int | None, items: int) -> int:
    """Processes worth starting for `items` items: never more than there are items, at least 1."""
    return max(1, min(int(workers or 1), items))


# ----------------------------------------------------------------------------------------------
# Worker side (module level, so spawned processes can import it)
# ----------------------------------------------------------------------------------------------

_init_failure: BaseException | None = None


def _initialise(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    # ProcessPoolExecutor answers a failing initializer by breaking the whole pool, which would look like every
    # item's worker dying. Keeping the exception and raising it from the first task hands the caller the
    # initializer's own exception (e.g. an EvaluationError), as the in-process path does.
    global _init_failure
    _init_failure = None
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the parent by _run_chunk
            _init_failure = exc


def _run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    if _init_failure is not None:
        raise _init_failure
    return [fn(item) for item in chunk]


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run_parallel(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int | None,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    cleanup: Callable[[], Any] | None = None,
    chunksize: int = 1,
    poll: Callable[[], Any] | None = None,
    poll_interval: float = 0.25,
) -> Iterator[Outcome[R]]:
    """Run `fn(item)` for every item on up to `workers` spawned processes; yield Outcomes as items finish.

    fn, the items and the initializer must be picklable (module-level functions, plain data).
    chunksize: consecutive items handed to one process together (so a per-process cache, e.g. a simulator
      built for one task, serves the whole chunk); outcomes of a chunk arrive together.
    cleanup: called in this process after the in-process path (pool processes free their state on exit).
    poll: called about every `poll_interval` seconds while waiting on the pool (e.g. to update a progress bar
      from a shared counter).
    """
    items = list(items)
    if worker_count(workers, len(items)) <= 1:
        yield from _in_process(fn, items, initializer, initargs, cleanup)
        return
    yield from _pooled(
        fn, items, worker_count(workers, len(items)), initializer, initargs, max(1, chunksize), poll, poll_interval
    )


def _in_process(fn, items, initializer, initargs, cleanup) -> Iterator[Outcome]:
    try:
        if initializer is not None:
            initializer(*initargs)
        for index, item in enumerate(items):
            yield Outcome(index, fn(item))
    finally:
        if cleanup is not None:
            cleanup()


def _pooled(fn, items, workers, initializer, initargs, chunksize, poll, poll_interval) -> Iterator[Outcome]:
    context = multiprocessing.get_context("spawn")
    todo = collections.deque(
        list(range(start, min(start + chunksize, len(items)))) for start in range(0, len(items), chunksize)
    )
    # Items that were in flight when a process died: each runs alone in a one-process pool until the culprit dies
    # again on its own (then it alone is reported) or finishes (then it was only a bystander).
    suspects: collections.deque[list[int]] = collections.deque()
    while todo or suspects:
        isolating = bool(suspects)
        source = suspects if isolating else todo
        size = 1 if isolating else workers
        lost: list[list[int]] = []
        with futures.ProcessPoolExecutor(
            size, mp_context=context, initializer=_initialise, initargs=(initializer, initargs)
        ) as pool:
            running: dict[futures.Future, list[int]] = {}
            try:
                while True:
                    # At most one chunk per process: nothing waits queued behind a busy process, so when the pool
                    # breaks, only what was really running is suspect.
                    while not lost and source and len(running) < size:
                        chunk = source.popleft()
                        running[pool.submit(_run_chunk, fn, [items[i] for i in chunk])] = chunk
                    if not running:
                        break
                    done, _ = futures.wait(running, timeout=poll_interval, return_when=futures.FIRST_COMPLETED)
                    if poll is not None:
                        poll()
                    for future in done:
                        chunk = running.pop(future)
                        try:
                            values = future.result()
                        except BrokenProcessPool:
                            lost.append(chunk)
                            continue
                        for index, value in zip(chunk, values, strict=True):
                            yield Outcome(index, value)
            except BaseException:
                for future in running:
                    future.cancel()
                raise
        if isolating:
            # One process, one item in flight: that item took the process down.
            for chunk in lost:
                yield Outcome(chunk[0], died=DIED_REASON)
        else:
            suspects.extend([index] for chunk in lost for index in chunk)


__all__ = ["DIED_REASON", "Outcome", "run_parallel", "worker_count"]
