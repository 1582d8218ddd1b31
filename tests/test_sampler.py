from po_ray.sampler import PairSampler, shard_evenly


def stream(world, steps, start=0, n=10, micro=2, ga=1, seed=3):
    out = []
    for step in range(start, steps):
        for micro_step in range(ga):
            for rank in range(world):
                s = PairSampler(n, seed, world, rank, micro, ga)
                out += s.indices(step, micro_step)
    return out


def test_each_pair_once_per_epoch_across_ranks():
    seen = stream(world=2, steps=5, n=20, micro=2)  # 5 steps x 4 pairs = one epoch of 20
    assert sorted(seen) == list(range(20))
    assert seen != list(range(20))  # shuffled


def test_resume_at_step_continues_the_same_stream():
    whole = stream(world=2, steps=8, n=10, micro=2, ga=2)
    assert stream(world=2, steps=3, n=10, micro=2, ga=2) + stream(world=2, steps=8, start=3, n=10, micro=2, ga=2) == whole


def test_epochs_reshuffle_and_cover():
    seen = stream(world=1, steps=10, n=10, micro=2)
    first, second = seen[:10], seen[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second


def test_shard_evenly_partitions():
    items = list(range(11))
    parts = [shard_evenly(items, 3, r) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sum(parts, []) == items
