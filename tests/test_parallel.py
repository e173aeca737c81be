"""The process-pool driver: in-process path, spawned workers, errors, and a worker that dies."""

from __future__ import annotations

import os

import pytest

from veorl.parallel import DIED_REASON, run_parallel, worker_count

_state: dict[str, object] = {}


def _setup(tag: str) -> None:
    _state["tag"] = tag
    _state["pid"] = os.getpid()


def _teardown() -> None:
    _state["cleaned"] = True


def _work(item: int) -> tuple[int, str, int]:
    """Item squared, with the initializer's tag and the pid of the process that ran it."""
    return item * item, str(_state.get("tag")), os.getpid()


def _die_on_three(item: int) -> int:
    if item == 3:
        os._exit(17)  # like a segfault or the OOM killer: no exception, the process is just gone
    return item + 100


def _raise_on_two(item: int) -> int:
    if item == 2:
        raise KeyError(f"item {item} is bad")
    return item


def _bad_setup() -> None:
    raise LookupError("no simulator here")


def test_worker_count():
    assert (worker_count(4, 2), worker_count(None, 5), worker_count(3, 0), worker_count(2, 9)) == (2, 1, 1, 2)


def test_one_worker_runs_in_this_process_with_initializer_and_cleanup():
    _state.clear()
    outcomes = list(run_parallel(_work, [1, 2, 3], 1, initializer=_setup, initargs=("here",), cleanup=_teardown))
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert [o.value for o in outcomes] == [(1, "here", os.getpid()), (4, "here", os.getpid()), (9, "here", os.getpid())]
    assert _state["cleaned"] is True and all(o.died is None for o in outcomes)


def test_workers_stream_every_item_with_their_own_initialised_state():
    _state.clear()
    items = [3, 1, 4, 1, 5]
    outcomes = list(
        run_parallel(_work, items, 2, initializer=_setup, initargs=("pool",), cleanup=_teardown, chunksize=2)
    )
    by_index = {o.index: o.value for o in outcomes}
    assert sorted(by_index) == list(range(len(items)))
    assert [by_index[i][0] for i in range(len(items))] == [x * x for x in items]
    pids = {value[2] for value in by_index.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {value[1] for value in by_index.values()} == {"pool"}
    assert "cleaned" not in _state  # cleanup belongs to the in-process path only


def test_a_dying_worker_is_reported_for_its_item_and_the_others_finish():
    outcomes = list(run_parallel(_die_on_three, list(range(6)), 2))
    assert sorted(o.index for o in outcomes) == list(range(6))  # nothing lost, nothing twice
    died = [o for o in outcomes if o.died]
    assert [(o.index, o.died, o.value) for o in died] == [(3, DIED_REASON, None)]
    assert {o.index: o.value for o in outcomes if not o.died} == {i: i + 100 for i in range(6) if i != 3}


@pytest.mark.parametrize("workers", [1, 2])
def test_an_exception_in_an_item_reaches_the_caller_as_itself(workers):
    with pytest.raises(KeyError, match="item 2 is bad"):
        list(run_parallel(_raise_on_two, [0, 1, 2, 3], workers))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_initializer_is_raised_not_reported_as_deaths(workers):
    with pytest.raises(LookupError, match="no simulator here"):
        list(run_parallel(_work, [1, 2, 3], workers, initializer=_bad_setup))
