import pytest

from captionfleet.worker.batcher import Batcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_size_trigger_flushes_at_max_items_without_time_passing() -> None:
    clock = FakeClock()
    batcher: Batcher[int] = Batcher(max_items=3, max_wait_s=10, clock=clock)
    assert batcher.add(1) == []
    assert batcher.add(2) == []
    assert batcher.add(3) == [[1, 2, 3]]
    assert len(batcher) == 0
    assert batcher.time_left() is None


def test_time_trigger_counts_from_first_item() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=100, max_wait_s=0.05, clock=clock)
    batcher.add("a")
    clock.now += 0.03
    batcher.add("b")  # a later item must not restart the clock
    assert not batcher.due()
    assert batcher.time_left() == pytest.approx(0.02)
    clock.now += 0.02
    assert batcher.due()
    assert batcher.flush() == ["a", "b"]
    assert not batcher.due()


def test_clock_restarts_with_next_batch() -> None:
    clock = FakeClock()
    batcher: Batcher[int] = Batcher(max_items=2, max_wait_s=1, clock=clock)
    batcher.add(1)
    clock.now += 5
    assert batcher.add(2) == [[1, 2]]
    batcher.add(3)
    assert batcher.time_left() == pytest.approx(1)


def test_cost_limit_flushes_before_overflow() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=10, max_wait_s=1, max_cost=100, clock=clock)
    assert batcher.add("a", cost=60) == []
    # "b" would bring the batch to 120 > 100: "a" goes alone, "b" opens the next batch.
    assert batcher.add("b", cost=60) == [["a"]]
    assert batcher.add("c", cost=40) == [["b", "c"]]


def test_item_costlier_than_limit_still_goes_through_alone() -> None:
    batcher: Batcher[str] = Batcher(max_items=10, max_wait_s=1, max_cost=100, clock=FakeClock())
    batcher.add("small", cost=10)
    assert batcher.add("huge", cost=500) == [["small"], ["huge"]]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        Batcher(max_items=0, max_wait_s=1)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(max_items=1, max_wait_s=-1)


def test_an_urgent_item_makes_the_batch_due_after_its_own_shorter_wait() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=8, max_wait_s=1.0, clock=clock, urgent_wait_s=0.01)
    batcher.add("bulk")
    clock.now += 0.5
    batcher.add("urgent", urgent=True)
    assert batcher.time_left() == pytest.approx(0.01)  # its own wait, not the bulk item's 0.5 s left
    assert batcher.urgent_rows == 1 and batcher.rows == 2
    clock.now += 0.01
    assert batcher.due()
    assert batcher.flush() == ["bulk", "urgent"]
    assert batcher.urgent_rows == 0
    batcher.add("bulk again")
    assert batcher.time_left() == pytest.approx(1.0)  # the urgent wait ended with its batch


def test_an_urgent_wait_never_exceeds_the_batch_wait() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=8, max_wait_s=0.02, clock=clock, urgent_wait_s=5)
    batcher.add("urgent", urgent=True)
    assert batcher.time_left() == pytest.approx(0.02)


def test_taking_the_urgent_items_leaves_the_others_with_their_cost_and_wait() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=4, max_wait_s=10, max_cost=100, clock=clock, urgent_wait_s=0.01)
    batcher.add("s1", cost=30)
    batcher.add("u1", cost=40, urgent=True)
    batcher.add("s2", cost=20)
    assert batcher.time_left() == pytest.approx(0.01)  # due at the urgent item's wait
    assert batcher.take_urgent() == ["u1"]
    assert batcher.urgent_rows == 0 and batcher.rows == 2
    assert batcher.time_left() == pytest.approx(10)  # the stream items' own wait again, from the first one
    assert batcher.add("s3", cost=49) == []  # 30 + 20 + 49 fits: u1's cost is gone
    assert batcher.add("s4", cost=1) == [["s1", "s2", "s3", "s4"]]
    assert batcher.take_urgent() == []


def test_taking_the_only_items_closes_the_open_batch() -> None:
    batcher: Batcher[str] = Batcher(max_items=4, max_wait_s=10, clock=FakeClock())
    batcher.add("u1", urgent=True)
    assert batcher.take_urgent() == ["u1"]
    assert batcher.rows == 0 and batcher.time_left() is None


# Two limits: (pixels, decoder sequences), as the pipeline counts them (an image's sequences are its beams).


def test_the_sequence_limit_sizes_the_batch_by_the_beams() -> None:
    batcher: Batcher[int] = Batcher(max_items=128, max_wait_s=1, max_cost=(0, 128), clock=FakeClock())
    four_beams = [batcher.add(i, cost=(0, 4)) for i in range(32)]
    assert four_beams[:-1] == [[]] * 31 and four_beams[-1] == [list(range(32))]  # 32 images x 4 beams = 128
    greedy = [batcher.add(i, cost=(0, 1)) for i in range(128)]
    assert greedy[-1] == [list(range(128))] and not any(greedy[:-1])  # 128 images x 1 beam


def test_either_limit_flushes_before_overflow() -> None:
    batcher: Batcher[str] = Batcher(max_items=10, max_wait_s=1, max_cost=(100, 8), clock=FakeClock())
    assert batcher.add("a", cost=(60, 2)) == []
    assert batcher.add("b", cost=(10, 7)) == [["a"]]  # 9 sequences > 8: "a" goes alone
    assert batcher.add("c", cost=(60, 2)) == [["b"]]  # 9 sequences again
    assert batcher.add("d", cost=(60, 1)) == [["c"]]  # 120 pixels > 100
    assert batcher.add("e", cost=(40, 1)) == [["d", "e"]]  # 100 pixels: full


def test_an_item_with_more_sequences_than_the_limit_still_goes_through_alone() -> None:
    batcher: Batcher[str] = Batcher(max_items=10, max_wait_s=1, max_cost=(0, 4), clock=FakeClock())
    batcher.add("greedy", cost=(0, 1))
    assert batcher.add("eight beams", cost=(0, 8)) == [["greedy"], ["eight beams"]]
    assert len(batcher) == 0


def test_taking_the_urgent_items_gives_back_their_sequences() -> None:
    clock = FakeClock()
    batcher: Batcher[str] = Batcher(max_items=8, max_wait_s=10, max_cost=(100, 8), clock=clock, urgent_wait_s=0.01)
    batcher.add("s1", cost=(10, 4))
    batcher.add("u1", cost=(10, 2), urgent=True)
    assert batcher.take_urgent() == ["u1"]
    assert batcher.add("s2", cost=(10, 3)) == []  # 4 + 3 fits: u1's 2 sequences are gone
    assert batcher.add("s3", cost=(10, 1)) == [["s1", "s2", "s3"]]


def test_a_cost_must_count_against_each_limit() -> None:
    batcher: Batcher[str] = Batcher(max_items=8, max_wait_s=1, max_cost=(100, 8), clock=FakeClock())
    with pytest.raises(ValueError, match="one cost per limit"):
        batcher.add("a", cost=10)
    with pytest.raises(ValueError, match="max_cost"):
        Batcher(max_items=1, max_wait_s=1, max_cost=(100, -1))
