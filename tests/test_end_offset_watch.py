"""The rule that ends a read-back (``EndOffsetWatch``), without a broker: the clock is given."""

from __future__ import annotations

from streamgmm.io.base import READBACK_SILENCE_SECONDS, EndOffsetWatch, TopicPartition

A, B = TopicPartition("out", 0), TopicPartition("out", 1)


def test_an_under_reporting_broker_with_a_writer_that_never_pauses_ends_at_the_first_fresh_end():
    watch = EndOffsetWatch({A: 10, B: 0}, may_under_report=True, now=0.0)
    now = 0.0
    position = 0
    ends = 10
    for _ in range(100):  # a record every 10 ms on A, never a second of silence on it
        now += 0.01
        position += 2  # the reader reads faster than the writer writes
        ends += 1
        watch.progressed(A, now)
        if now >= 0.2 and A in watch.wants_fresh_ends():
            watch.fresh_ends({A: ends})  # queried once: later ends are not waited for
        if A not in watch.pending({A: position, B: 0}, now):
            break
    assert position >= 30  # passed the first fresh end (30), not chasing later ones
    assert now < 0.3
    assert watch.pending({A: position, B: 0}, now) == {B}  # B: idle, not a second yet
    assert watch.pending({A: position, B: 0}, READBACK_SILENCE_SECONDS) == set()


def test_a_fresh_end_that_is_not_higher_proves_nothing():
    watch = EndOffsetWatch({A: 10}, may_under_report=True, now=0.0)
    watch.fresh_ends({A: 10})
    assert watch.wants_fresh_ends() == {A}
    watch.progressed(A, 0.5)
    assert watch.pending({A: 11}, 1.0) == {A}
    assert watch.pending({A: 11}, 1.5) == set()  # a second after the last record


def test_below_the_reported_end_a_partition_is_never_done():
    for may_under_report in (True, False):
        watch = EndOffsetWatch({A: 10}, may_under_report=may_under_report, now=0.0)
        watch.fresh_ends({A: 20})
        assert watch.pending({A: 9}, 100.0) == {A}


def test_a_broker_that_reports_ends_right_needs_no_fresh_end_and_no_silence():
    watch = EndOffsetWatch({A: 10, B: 3}, may_under_report=False, now=0.0)
    assert watch.wants_fresh_ends() == set()
    assert watch.pending({A: 10, B: 2}, 0.0) == {B}
    assert watch.pending({A: 10, B: 3}, 0.0) == set()
