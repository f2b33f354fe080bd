"""The progress bar's rate: none before there is one."""

from __future__ import annotations

import io

from fastq.progress import MIN_ELAPSED, byte_bar, shown_rate

# -- the progress bar's rate ------------------------------------------------------------------------------


def test_no_rate_before_there_is_one():
    assert shown_rate(0.0, 10**9) is None
    assert shown_rate(1e-6, 10**6) is None  # what read "11.5TB/s"
    assert shown_rate(MIN_ELAPSED / 2, 10**12) is None
    assert shown_rate(MIN_ELAPSED, 0) is None
    assert shown_rate(2.0, 3 * 10**9) == 1.5 * 10**9
    assert shown_rate(MIN_ELAPSED, 10**6) == 10**6 / MIN_ELAPSED


def test_bar_shows_the_rate_shown_rate_gives():
    clock = [100.0]
    bar = byte_bar(10**9, "x", unit_divisor=1000)
    bar.fp = io.StringIO()
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    try:
        clock[0] += 1e-4
        bar.update(10**8)
        early = str(bar)
        assert "?B/s" in early and "TB/s" not in early and "<?" in early, early
        clock[0] += 2.0
        bar.update(10**8)
        later = str(bar)
        assert "100MB/s" in later or "99.9MB/s" in later, later
    finally:
        bar.close()
