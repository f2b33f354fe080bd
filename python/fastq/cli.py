"""The ``fastq`` command (also ``python -m fastq``).

    fastq convert SRC DST --load-in-4bit --quant-type nf4 [--double-quant] [--max-shard-size 5GB] ...
    fastq inspect PATH [--json] [--verify] [--exact | --no-estimate]
    fastq demo

Exit status: 0 done, 1 a fastq error (the checkpoint, the destination, the disk: one line on stderr),
2 a usage error (flags that are malformed or contradict each other: argparse's usage and error, or one
``fastq: error:`` line), 130 interrupted. Nothing heavy is imported before a command needs it: ``--help``
imports neither torch nor transformers nor bitsandbytes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

__all__ = ["build_parser", "main"]


class UsageError(Exception):
    """Flags that parse but make no valid command (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return value


def _bool_pair(group, name: str, dest: str, yes: str, no: str) -> None:
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=yes)
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", help=no)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastq", description="Quantize checkpoints to bitsandbytes' 4-bit and 8-bit formats.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert",
        help="quantize a checkpoint into the checkpoint transformers saves for a bitsandbytes model",
        description="Quantize SRC (config.json + safetensors) into DST on the CPU, streaming, atomically. "
        "The flags are BitsAndBytesConfig's fields; their defaults are its defaults.",
    )
    c.add_argument("src", help="folder with config.json and safetensors")
    c.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    bits = c.add_mutually_exclusive_group(required=True)
    bits.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4/FP4 (Linear4bit)")
    bits.add_argument("--load-in-8bit", action="store_true", help="LLM.int8 (Linear8bitLt)")
    c.add_argument("--quant-type", choices=("nf4", "fp4"), default=None, help="4-bit data type (default fp4)")
    dq = c.add_mutually_exclusive_group()
    _bool_pair(dq, "double-quant", "double_quant", "quantize the 4-bit statistics again (bnb_4bit_use_double_quant)",
               "do not (the default)")
    c.add_argument("--compute-dtype", default=None, help="bnb_4bit_compute_dtype (default float32)")
    c.add_argument("--quant-storage", default=None, help="bnb_4bit_quant_storage (default uint8)")
    c.add_argument("--blocksize", type=int, default=None, help="4-bit block size (default 64)")
    c.add_argument("--skip-modules", nargs="+", default=None, metavar="MODULE", help="llm_int8_skip_modules")
    c.add_argument("--keep-in-fp32-modules", nargs="+", default=None, metavar="MODULE", help="modules kept unquantized in float32")
    c.add_argument("--threshold", type=float, default=None, help="llm_int8_threshold (default 6.0)")
    c.add_argument("--quantize-experts", action="store_true", default=None,
                   help="also quantize fused MoE experts (fastq.load(quantize_experts=True); convert refuses it: "
                        "no loader reads that layout yet)")
    c.add_argument("--dtype", default=None, help="dtype of the unquantized tensors (default: the config's)")
    c.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    c.add_argument("--threads", type=_positive_int, default=None, help="quantization threads (default: every core)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--no-fsync", dest="fsync", action="store_false", help="do not sync files before the final rename")
    c.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (config.json)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="tensors, dtypes, quantization and load memory of a checkpoint")
    i.add_argument("path", help="a checkpoint folder or safetensors file")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--verify", action="store_true", help="check shards against fastq-manifest.json")
    est = i.add_mutually_exclusive_group()
    est.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the 4-bit / 8-bit estimates")
    est.add_argument("--exact", action="store_true",
                     help="estimate by building the empty model (torch, transformers, bitsandbytes: seconds) even "
                          "where the headers suffice")

    sub.add_parser("demo", help="quantize and load a real model (SmolLM2-135M) on the CPU")
    return parser


def _quant_config(args):
    from .config import QuantConfig

    fields = {
        "load_in_4bit": args.load_in_4bit,
        "load_in_8bit": args.load_in_8bit,
        "bnb_4bit_quant_type": args.quant_type,
        "bnb_4bit_use_double_quant": args.double_quant,
        "bnb_4bit_compute_dtype": args.compute_dtype,
        "bnb_4bit_quant_storage": args.quant_storage,
        "blocksize": args.blocksize,
        "llm_int8_skip_modules": args.skip_modules,
        "keep_in_fp32_modules": args.keep_in_fp32_modules,
        "llm_int8_threshold": args.threshold,
        "quantize_experts": args.quantize_experts,
    }
    return QuantConfig(**{k: v for k, v in fields.items() if v is not None})


def _checked_convert_flags(args):
    """The QuantConfig, shard size and dtype the flags ask for; a ``UsageError`` for a value fastq refuses
    (the checks are QuantConfig's, ``parse_size``'s and the loader's own, so the CLI accepts what the
    library accepts)."""
    from .convert import parse_size
    from .errors import ConfigError
    from .resolve import dtype_from_name

    try:
        cfg = _quant_config(args)
        limit = parse_size(args.max_shard_size)
        if args.dtype is not None and args.dtype != "auto":
            dtype_from_name(args.dtype, "--dtype")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return cfg, limit


def _convert(args) -> int:
    cfg, limit = _checked_convert_flags(args)
    from .convert import convert

    dst = convert(
        args.src, args.dst, cfg, max_shard_size=limit, threads=args.threads, resume=args.resume,
        progress=not args.quiet, dtype=args.dtype, overwrite=args.overwrite, fsync=args.fsync,
        trust_remote_code=args.trust_remote_code,
    )
    if not args.quiet:
        print(f"fastq convert: wrote {dst}", file=sys.stderr)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _inspect(args) -> int:
    from .inspect import inspect_checkpoint

    r = inspect_checkpoint(args.path, estimate=args.estimate, exact=args.exact, verify=args.verify)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['path']}: {r['tensors']} tensors, {_size(r['total_bytes'])} in {r['shards']} shard(s)")
    if r["architectures"]:
        print(f"  architecture: {', '.join(r['architectures'])}")
    for dt, d in sorted(r["dtypes"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"  {dt:>8}: {d['tensors']:6d} tensors, {_size(d['bytes'])}")
    q = r["quantization"]
    if q is None:
        print("  quantization: none")
    else:
        if q["quant_method"] != "bitsandbytes":
            print(f"  quantization: {q['quant_method']} (fastq handles bitsandbytes checkpoints only)")
        else:
            what = q["method"] or "bitsandbytes"
            print(f"  quantization: {what}; {sum(q['4bit_weights'].values())} 4-bit and {q['int8_weights']} int8 weights")
    how = ""
    if r.get("estimate") == "from headers":
        how = " - estimated from the headers"
    elif r.get("estimate") == "exact":
        how = f" - exact, from the built model ({r['estimate_note']})"
    print(f"  memory of a load (weights){how}:")
    for k, v in r["memory"].items():
        print(f"    {k:>24}: {_size(v)}")
    if "manifest" in r:
        m = r["manifest"]
        line = f"  fastq manifest: {m['shards']} shard(s) recorded"
        if "verified" in m:
            bad = [n for n, ok in m["verified"].items() if not ok]
            line += "; all verified" if not bad else f"; MISMATCH: {', '.join(bad)}"
        print(line)
        if "verified" in m and any(not ok for ok in m["verified"].values()):
            return 1
    return 0


def _demo(args) -> int:
    if importlib.util.find_spec("fastq.demo") is None:
        print("fastq: the demo is not part of this installation", file=sys.stderr)
        return 2
    importlib.import_module("fastq.demo").main()
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastq`` console script; returns the exit status (0 ok, 1 error, 2 usage,
    130 Ctrl-C)."""
    from .errors import FastqError

    args = build_parser().parse_args(argv)  # exits with 2 on a usage error
    run = {"convert": _convert, "inspect": _inspect, "demo": _demo}[args.command]
    try:
        return run(args)
    except UsageError as e:
        print(f"fastq: error: {_one_line(e)} (see fastq {args.command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastq: interrupted", file=sys.stderr)
        return 130
    except (FastqError, OSError) as e:
        print(f"fastq: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
