"""Length-grouped sampling: every record once per epoch, reproducible, far less padding."""
import numpy as np
import pytest

from dolly.data.batching import LengthGroupedSampler, padding_efficiency

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def lengths():
    # a long-tailed mix like instruction data: many short records, some long ones
    rng = np.random.default_rng(7)
    return np.concatenate([rng.integers(30, 80, 700), rng.integers(80, 400, 300)])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_index_exactly_once_per_epoch(lengths, world_size):
    s = LengthGroupedSampler(lengths, batch_size=16, world_size=world_size, group_batches=8, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == len(s) == len(lengths)
        assert sorted(order) == list(range(len(lengths)))


def test_deterministic_per_seed_and_epoch(lengths):
    def order(seed, epoch):
        s = LengthGroupedSampler(lengths, 16, 2, 8, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(4, 0)
    assert order(3, 0) != order(3, 1)  # a new shuffle each epoch


def test_padding_efficiency_much_better_than_random(lengths):
    batch = 16
    rng = np.random.default_rng(0)
    random = np.mean([padding_efficiency(lengths, rng.permutation(len(lengths)), batch)
                      for _ in range(5)])
    grouped = padding_efficiency(lengths, list(LengthGroupedSampler(lengths, batch, 1, 8, 0)), batch)
    wide = padding_efficiency(lengths, list(LengthGroupedSampler(lengths, batch, 1, 64, 0)), batch)
    assert random < 0.4  # this long tail wastes most of a random batch
    assert grouped > 0.8 and grouped > 2 * random
    assert wide > 0.95  # larger megabatches pad even less
    assert padding_efficiency([5, 5, 3], [0, 2, 1], 2) == pytest.approx(13 / 15)  # [5,3] [5]


def test_every_rank_gets_little_padding(lengths):
    """Batch j goes to rank j % world_size (accelerate's sharding): each rank's batches are
    still cut from length-sorted megabatches."""
    batch, world = 16, 2
    order = np.array(list(LengthGroupedSampler(lengths, batch, world, 8, 0)))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    for rank in range(world):
        mine = np.concatenate(batches[rank::world])
        assert padding_efficiency(lengths, mine, batch) > 0.85


def test_short_last_step_stays_last():
    # 10 records, steps of 2 x 2: two full steps and one of 2 records. Record i has length i + 1.
    s = LengthGroupedSampler(list(range(1, 11)), batch_size=2, world_size=2, group_batches=1, seed=0)
    order = list(s)
    assert sorted(order) == list(range(10))
    # The 2 leftover records (the last megabatch of the seed-0 permutation, longest first) form
    # the tail. Shuffled with the full steps, this seed would put them in the middle
    # ([7, 6, 4, 2, 8, 1, 9, 5, 3, 0]).
    assert order[8:] == [8, 1]
    assert order == [7, 6, 4, 2, 9, 5, 3, 0, 8, 1]
