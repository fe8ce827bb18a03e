"""bench.http_latency's steady-state rate: the first model call's answers are not counted against its time."""

from bench.http_latency import steady_rate


def test_the_first_calls_answers_are_left_out_of_the_rate() -> None:
    # Three model calls of 4 rows, one second apart: 8 images answered in the 2 s after the first answer.
    times = [t + jitter for t in (10.0, 11.0, 12.0) for jitter in (0.0, 0.001, 0.002, 0.003)]
    assert steady_rate(times) == 8 / 2.003


def test_too_few_answers_give_no_rate() -> None:
    assert steady_rate([]) == 0.0
    assert steady_rate([5.0]) == 0.0
