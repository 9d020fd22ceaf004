import pytest
from hypothesis import given, settings, strategies as st

from mmsparse.data import ShardedSampler


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), world=st.integers(1, 8), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 5))
def test_shards_partition_the_epoch(n, world, shuffle, drop_last, seed):
    if drop_last and n < world:
        return
    shards = [list(ShardedSampler(n, world, r, shuffle=shuffle, seed=seed, drop_last=drop_last))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == (n // world) * world
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world


def test_epochs_reshuffle_and_are_reproducible():
    s = ShardedSampler(50, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(50))
    t = ShardedSampler(50, seed=3)
    t.set_epoch(1)
    assert list(t) == e1
    assert list(ShardedSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world, rank", [(1, 0), (3, 1)])
def test_resume_continues_where_it_stopped(world, rank):
    full = ShardedSampler(40, world, rank, seed=9)
    full.set_epoch(2)
    expected = list(full)
    run = ShardedSampler(40, world, rank, seed=9)
    run.set_epoch(2)
    it = iter(run)
    seen = [next(it) for _ in range(5)]
    state = run.state_dict()
    assert state["position"] == 5 and state["epoch"] == 2
    resumed = ShardedSampler(40, world, rank, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected) - 5
    assert seen + list(resumed) == expected
    assert list(resumed) == expected  # the next pass is a whole epoch again


def test_state_with_explicit_consumed_count_and_errors():
    s = ShardedSampler(10)
    assert s.state_dict(consumed=4)["position"] == 4
    with pytest.raises(ValueError, match="n=10, num_replicas=1; this sampler has n=11"):
        ShardedSampler(11).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="position must be in"):
        ShardedSampler(10).load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="n must be > 0"):
        ShardedSampler(0)
