"""Global batches that do not depend on the process count (halo_jax/data/pipeline.py: GlobalBatchShare,
make_global_iterator) and the rows a process holds (parallel/distributed.py: process_local_rows)."""

import json

import jax
import numpy as np
import pytest

from halo_jax.data.pipeline import GlobalBatchShare, make_global_iterator
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.parallel.sharding import batch_sharding

N = 21  # not a multiple of the global batch: the end of each epoch is carried into the next batch


class Numbers:
    """A random-access source of N records with ids."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": np.int32(i)}

    def ids(self):
        return [f"n{i}" for i in range(N)]


def global_batches(process_count: int, steps: int, global_batch: int = 8, seed: int = 3, **kw) -> list[list[int]]:
    """Each global batch as the concatenation of the processes' local batches (process order)."""
    share = global_batch // process_count
    its = [make_global_iterator(Numbers(), global_batch=global_batch, seed=seed,
                                rows=slice(p * share, (p + 1) * share), **kw) for p in range(process_count)]
    out = []
    for _ in range(steps):
        local = [next(it)["x"] for it in its]
        assert all(len(b) == share for b in local)
        out.append(np.concatenate(local).tolist())
    return out


def test_global_batches_do_not_depend_on_the_process_count():
    steps = 6  # 48 records: two passes over the source and a bit
    one, two, four = global_batches(1, steps), global_batches(2, steps), global_batches(4, steps)
    assert one == two == four
    flat = sum(one, [])
    assert sorted(flat[:N]) == list(range(N)) and sorted(flat[N:2 * N]) == list(range(N))  # each epoch once
    assert flat[:N] != list(range(N)) and flat[:N] != flat[N:2 * N]  # shuffled, a new order each epoch
    assert global_batches(2, steps, seed=4) != two
    assert sum(global_batches(2, 2, shuffle=False), []) == list(range(16))


def test_share_reads_only_its_rows_and_keeps_whole_batches():
    read = []

    class Logged(Numbers):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    share = GlobalBatchShare(Logged(), 8, seed=0, rows=slice(4, 8), num_epochs=1, shuffle=False)
    assert share.local_batch == 4 and len(share) == 8  # 21 records: 2 whole global batches of 8
    assert [share[i]["x"] for i in range(len(share))] == [4, 5, 6, 7, 12, 13, 14, 15]
    assert sorted(read) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert share.ids() == Numbers().ids()


def test_global_iterator_resumes_and_refuses_another_pipeline():
    def build(global_batch=8):
        return make_global_iterator(Numbers(), global_batch=global_batch, seed=7, rows=slice(4, 8))

    it = build()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["x"].tolist() for _ in range(3)]
    resumed = build()
    resumed.set_state(state)
    assert [next(resumed)["x"].tolist() for _ in range(3)] == expected
    with pytest.raises(ValueError, match="different pipeline .*global_batch"):
        build(global_batch=12).set_state(state)  # same local batch of 4, other global batches


def test_global_batch_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a non-empty slice inside a global batch of 8"):
        GlobalBatchShare(Numbers(), 8, seed=0, rows=slice(6, 10))
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        GlobalBatchShare(Numbers(), 32, seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        GlobalBatchShare(Numbers(), 0, seed=0)
    # Default rows: this process's share (one process here: the whole batch).
    assert GlobalBatchShare(Numbers(), 8, seed=0).rows == slice(0, 8)


def test_process_local_rows_of_a_batch_sharding():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert distributed.process_local_rows(16, batch_sharding(mesh, 2)) == slice(0, 16)
    assert distributed.process_local_rows(16, jax.sharding.NamedSharding(mesh, jax.P())) == slice(0, 16)


def test_one_process_gives_make_iterators_batches():
    """On one process the global iterator is `make_iterator`'s (a switch keeps single-host runs' batches)."""
    from halo_jax.data.pipeline import make_iterator

    a = make_global_iterator(Numbers(), global_batch=8, seed=5, rows=slice(0, 8))
    b = make_iterator(Numbers(), batch_size=8, seed=5, num_epochs=None, process_index=0, process_count=1)
    assert [next(a)["x"].tolist() for _ in range(5)] == [next(b)["x"].tolist() for _ in range(5)]
