"""What a GPU fill's timeline says (the ``timeline_*.json`` files benches/gpu/compare.py writes): how long
no read was in flight and what the copy stream and the device did meanwhile, how much the copies and the
device work overlapped, how many reads were in flight on average, and how long each read's bytes waited
for their copy to be queued - the figures BENCHMARKS.md's run 10 reads off to tell a host-bound fill from
a read- or copy-bound one.

    python3 benches/gpu/timeline.py timeline_fq_nf4.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _busy(spans, a: float, b: float) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in spans)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else 0.0


def analyse(spans: dict[str, list[list[float]]]) -> dict:
    """The figures of one timeline (``{"read": [[start, end], ...], "copy": [...], "device": [...]}``,
    seconds; the k-th copy is the k-th read's slot)."""
    reads, copies, device = spans["read"], spans.get("copy", []), spans.get("device", [])
    edges = sorted([(a, 1) for a, _ in reads] + [(b, -1) for _, b in reads])
    gaps, n, last = [], 0, None
    for t, step in edges:
        if n == 0 and last is not None and t > last:
            gaps.append((last, t))
        n += step
        if n == 0:
            last = t
    first, end = reads[0][0], reads[-1][1]
    return {
        "reads": len(reads),
        "read_span_s": end - first,
        "no_read_s": sum(b - a for a, b in gaps),
        "copy_busy_in_no_read_s": sum(_busy(copies, a, b) for a, b in gaps),
        "device_busy_in_no_read_s": sum(_busy(device, a, b) for a, b in gaps),
        "copy_device_overlap_s": sum(_busy(device, a, b) for a, b in copies),
        "reads_in_flight": sum(b - a for a, b in reads) / (end - first) if end > first else 0.0,
        "read_end_to_copy_start_ms": 1e3 * _median([c[0] - r[1] for r, c in zip(reads, copies, strict=False)]),
    }


def main() -> None:
    for name in sys.argv[1:] or sys.exit(__doc__):
        r = analyse(json.loads(Path(name).read_text()))
        print(f"{name}: {r['reads']} reads over {r['read_span_s']:.3f} s, {r['reads_in_flight']:.2f} in flight on "
              f"average; no read in flight {r['no_read_s']:.3f} s (copies busy {r['copy_busy_in_no_read_s']:.3f} s, "
              f"device {r['device_busy_in_no_read_s']:.3f} s of it); copies and device work overlap "
              f"{r['copy_device_overlap_s']:.3f} s; a read's bytes wait {r['read_end_to_copy_start_ms']:.2f} ms "
              "(median) for their copy")


if __name__ == "__main__":
    main()
