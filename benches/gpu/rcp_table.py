"""The GPU's approximate reciprocal, whole: where ``rcp.approx.ftz.f32`` differs from the correctly rounded
``1/x`` (run on the GPU machine).

    python3 benches/gpu/rcp_table.py --out $OUT [--dry-run] [--no-sass]
    python3 benches/gpu/rcp_table.py --sass-only [--cuda 130]

bitsandbytes builds its CUDA kernels with ``--use_fast_math``: a block is scaled by ``1.0f / absmax``, which
becomes ``rcp.approx.ftz.f32`` (the SFU's MUFU.RCP), not the correctly rounded reciprocal fastq's CPU
kernels took until 2026-12-08. That was the whole of what separated a CPU conversion from a GPU one
(FP4's 22 ties and int8's 12 CB on the fixture, 26 nested codes of ~101 million on a 7B, BENCHMARKS
run 13): each such value lay where the two reciprocals fall on either side of a rounding boundary.

The reciprocal of ``x = m * 2^e`` is that of its mantissa ``m`` in [1, 2) scaled by ``2^-e`` (away from the
ends of the range, which the script checks on a sample of every binade), so 2^23 values determine it.
This script computes them on the GPU - an NVRTC kernel with the one PTX instruction, through torch's
jiterator - and writes ``rcp_approx.safetensors``: ``differs`` and ``above`` (2^23 bits each, packed
little-endian: where the two differ, and where the approximate one is the larger), ``far_index`` and
``far_delta`` (the mantissas where they lie more than one ulp apart, and by how many ulps), with the
GPU's name in the metadata - 2 MiB whatever the count, so it comes back from the device machine; the
summary says how many differing results lie within one ulp of the true 1/x (all of them: ``differs``
alone then says the GPU's reciprocal, and is written raw as ``rcp_gpu.bin``, the map fastq's CPU kernels
include: rust/core/quant/rcp_gpu.bin, read by reciprocal.rs; written by an H100 on 2026-12-08). With it
the CPU kernels take the GPU's reciprocal bit for bit, and the fixture
(tests/fixtures/bnb_cuda_nested.safetensors) says that removed every difference.

The summary also counts the reciprocal instructions in bitsandbytes' quantize kernels (``--sass-only``: that
alone, no GPU needed; ``cuobjdump`` from the PATH or Triton's package). Seen 2026-12-07 on the 2-core
machine, bitsandbytes 0.50.2's libbitsandbytes_cuda130.so, sm_90: every kQuantizeBlockwise (78 kernels, the Small ones included)
and kInt8VectorQuant (2) holds MUFU.RCP and no FCHK - the int8 kernel's scale is ``MUFU.RCP`` then
``FMUL.FTZ`` by 127, the form fastq's int8 kernel computes (``quant::row_scale``).

``--dry-run`` (no GPU): the same steps with the correctly rounded reciprocal in place of the GPU's, to
check the script; the table is then empty.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

KERNEL = """
template <typename T> T rcp_approx(T x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
"""


def mantissas() -> np.ndarray:
    """Every float32 in [1, 2), in mantissa order."""
    return (np.arange(1 << 23, dtype=np.uint32) | np.uint32(127 << 23)).view(np.float32)


def exact(x: np.ndarray) -> np.ndarray:
    """The correctly rounded float32 reciprocal (float64 division then one rounding: exact for float32)."""
    return (1.0 / x.astype(np.float64)).astype(np.float32)


@functools.cache
def _rcp_kernel():
    return torch.cuda.jiterator._create_jit_fn(KERNEL)


def approx_gpu(x: np.ndarray) -> np.ndarray:
    return _rcp_kernel()(torch.from_numpy(x).cuda()).cpu().numpy()


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` in ulps for positive finite float32 of one binade or neighbouring ones."""
    return a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)


def cuobjdump() -> str | None:
    """A ``cuobjdump``: on the PATH, else the one Triton's package carries (the GPU machine's image has
    Triton; so can a machine without a GPU)."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.exists() else None


def sass_reciprocals(arch: str = "sm_90", cuda: str | None = None) -> dict:
    """The reciprocal instructions in bitsandbytes' quantize kernels for ``arch`` (an H100's or H200's),
    in its CUDA library for the running torch's CUDA (or ``cuda``, e.g. "130"): MUFU.RCP is the
    approximate reciprocal; FCHK would mark a correctly rounded division. Needs no GPU."""
    import subprocess

    import bitsandbytes

    tool = cuobjdump()
    version = cuda or (torch.version.cuda or "13.0").replace(".", "")
    lib = Path(bitsandbytes.__file__).parent / f"libbitsandbytes_cuda{version}.so"
    if tool is None or not lib.exists():
        return {"checked": False, "why": "no cuobjdump" if tool is None else f"no {lib.name}"}
    text = subprocess.run([tool, "-sass", "-arch", arch, str(lib)], check=False, capture_output=True, text=True).stdout
    out: dict[str, dict[str, int]] = {}
    for part in text.split("Function : ")[1:]:  # one per kernel, its mangled name first
        name = part.split(maxsplit=1)[0]
        for fn in ("kQuantizeBlockwise", "kInt8VectorQuant"):
            if fn in name:
                counts = out.setdefault(fn, {"kernels": 0, "with MUFU.RCP": 0, "FCHK": 0})
                counts["kernels"] += 1
                counts["with MUFU.RCP"] += "MUFU.RCP" in part
                counts["FCHK"] += part.count("FCHK")
    return {"checked": True, "library": lib.name, "arch": arch, "kernels": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/fastq-rcp"))
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the correctly rounded reciprocal stands in")
    ap.add_argument("--sass-only", action="store_true", help="only the instructions of bitsandbytes' kernels (no GPU)")
    ap.add_argument("--no-sass", action="store_true", help="skip the disassembly (no bitsandbytes needed)")
    ap.add_argument("--cuda", help='the bitsandbytes CUDA library to read, e.g. "130" (default: torch\'s CUDA)')
    args = ap.parse_args()
    if args.sass_only:
        print(json.dumps(sass_reciprocals(cuda=args.cuda)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    approx = exact if args.dry_run else approx_gpu
    x = mantissas()
    got, want = approx(x), exact(x)
    d = ulps(got, want)
    index = np.nonzero(d)[0].astype(np.uint32)
    delta = d[index]
    if np.abs(delta).max(initial=0) > 127:
        sys.exit("a difference beyond an int8 of ulps: not an approximate reciprocal")
    true = 1.0 / x.astype(np.float64)  # the exact 1/x (float64 holds it closely enough to compare)
    # Within one ulp of the true 1/x, a result that is not the correctly rounded one can only be the other
    # float32 neighbour of 1/x: then one bit per mantissa says the GPU's reciprocal whole.
    other_side = np.abs(got[index].astype(np.float64) - true[index]) < np.abs(
        np.nextafter(got[index], np.float32(np.inf)).astype(np.float64) - got[index].astype(np.float64))
    # How far from the true 1/x the GPU's result lies, and how close to a rounding midpoint the true 1/x of
    # a differing mantissa comes: if the differing ones all lie near midpoints, a kernel need consult the map
    # only where the correctly rounded reciprocal is near one (residual from the f64 quotient).
    ulp = np.spacing(want).astype(np.float64)
    err = np.abs(got.astype(np.float64) - true) / ulp
    mid = np.abs(np.abs(want.astype(np.float64) - true) / ulp - 0.5)
    nearest_differing = float(mid[index].max(initial=0.0))
    # The scaling claim, on a sample of every binade the quantizers meet (absmax from 2^-126 to 2^127).
    rng = np.random.default_rng(0)
    sample = x[rng.integers(0, 1 << 23, 4096)]
    base = approx(sample).astype(np.float64)
    bad = {}
    for e in range(-126, 128):
        r = approx((sample.astype(np.float64) * 2.0**e).astype(np.float32))
        scaled = (base * 2.0**-e).astype(np.float32)
        n = int(np.sum(r.view(np.uint32) != scaled.view(np.uint32)))
        if n:
            bad[e] = n
    from safetensors.numpy import save_file

    name = "dry-run" if args.dry_run else torch.cuda.get_device_name()
    meta = {"device": name, "instruction": "rcp.approx.ftz.f32", "torch": torch.__version__,
            "binades_not_scaling": json.dumps(bad)}
    far = np.abs(delta) > 1
    table = {"differs": np.packbits(d != 0, bitorder="little"), "above": np.packbits(d > 0, bitorder="little"),
             "far_index": index[far], "far_delta": delta[far].astype(np.int8)}
    save_file(table, str(args.out / "rcp_approx.safetensors"), metadata=meta)
    if not far.any() and bool(other_side.all()):  # the map a CPU kernel would take (the docstring)
        table["differs"].tofile(args.out / "rcp_gpu.bin")
    summary = {"device": name, "differ": int(index.size), "of": 1 << 23,
               "deltas": {int(k): int(v) for k, v in zip(*np.unique(delta, return_counts=True), strict=True)},
               "within_one_ulp_of_1/x": int(other_side.sum()),
               "max_error_ulps": float(err.max()),
               "differing_max_distance_from_midpoint_ulps": nearest_differing,
               "agreeing_within_that_of_midpoint": int(np.sum(mid[d == 0] <= nearest_differing)),
               "binades_not_scaling": bad}
    if not args.no_sass:
        summary["bitsandbytes_sass"] = sass_reciprocals(cuda=args.cuda)
    (args.out / "rcp_approx.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
