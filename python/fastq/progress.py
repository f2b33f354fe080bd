"""The progress bars of ``fastq.load`` and ``fastq.convert``: bytes done, rate and time left, through tqdm.

tqdm's rate is bytes over elapsed time from the first update on, so a bar whose first tensors are placed
in microseconds (zero-copy views of the mapping, shards verified on resume) opened with rates such as
"78.4TB/s" and a time left of zero. Here the bar shows no rate ("?B/s", time left "?") until
``MIN_ELAPSED`` seconds have passed, then the average rate since the start.
"""

from __future__ import annotations

__all__ = ["MIN_ELAPSED", "byte_bar", "shown_rate"]

#: Seconds since the start before a bar shows a rate.
MIN_ELAPSED = 0.5


def shown_rate(elapsed: float, nbytes: int) -> float | None:
    """The rate a bar shows after ``nbytes`` bytes in ``elapsed`` seconds: None (no rate yet) before
    ``MIN_ELAPSED`` seconds or with no byte done, else the average bytes per second.

    Args:
        elapsed: seconds since the bar started.
        nbytes: bytes done since then.

    Returns:
        Bytes per second, or None.
    """
    if not elapsed or elapsed < MIN_ELAPSED or nbytes <= 0:
        return None
    return nbytes / elapsed


def byte_bar(total: int, desc: str, *, disable: bool = False, unit_divisor: int = 1000):
    """A tqdm bar over ``total`` bytes whose rate is ``shown_rate``'s (``tqdm.auto``: a widget in a
    notebook, text on a terminal)."""
    from tqdm.auto import tqdm

    class ByteBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            rate = shown_rate(d.get("elapsed") or 0.0, (d.get("n") or 0) - (d.get("initial") or 0))
            # tqdm prints a rate of 0 as "?" (and the time left as "?"); None would make it compute its own.
            d["rate"] = rate if rate is not None else 0
            return d

    return ByteBar(total=total, unit="B", unit_scale=True, unit_divisor=unit_divisor, desc=desc, disable=disable)
