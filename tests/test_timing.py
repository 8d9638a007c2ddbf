"""graphopt.timing: engines timed together interleave on one thread and are timed apart on more (an engine's
spinning pool threads slowed the other 4x when they alternated on 2 threads)."""
from graphopt import timing


def _recording(log, label):
    return lambda: log.append(label)


def _switches(log) -> int:
    return sum(a != b for a, b in zip(log, log[1:]))


def test_one_thread_interleaves_the_engines():
    log = []
    ms = timing.time_engines([_recording(log, "a"), _recording(log, "b")], rounds=5, sample_s=0, threads=1)
    assert len(ms) == 2 and _switches(log) >= 2 * 5 - 1


def test_more_threads_time_each_engine_apart_after_settling(monkeypatch):
    monkeypatch.setattr(timing, "SETTLE_S", 0.01)
    log = []
    ms = timing.time_engines([_recording(log, "a"), _recording(log, "b")], rounds=5, sample_s=0, threads=2)
    assert len(ms) == 2 and _switches(log) == 1
    assert log.count("a") > 2 * 5      # settling calls before the rounds
    log.clear()
    timing.time_engines([_recording(log, "a"), _recording(log, "b")], rounds=5, sample_s=0, threads=None)
    assert _switches(log) == 1         # all cores: more than one thread here too
