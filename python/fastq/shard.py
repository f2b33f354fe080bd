"""FSDP's share: under ``torch.distributed`` (world size > 1) each rank loads only the rows of every
parameter that FSDP2's ``fully_shard`` will make it own; the one home of that logic.

``fully_shard`` shards every parameter on dim 0 with ``torch.chunk`` semantics over the world (torch
2.x, ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py`` ``_init_sharded_param`` and
``_fsdp_common.py`` ``_chunk_with_empty``): with ``c = ceil(R / world)`` rank ``r`` owns rows
``[r*c, min((r+1)*c, R))`` (trailing ranks may own none). It copies that chunk into a new tensor and
drops the full one; buffers are replicated. So each parameter here is a full-size tensor over an
anonymous, lazily zeroed mapping into which only the rank's rows are written: the other pages are
never touched, so never resident, and ``fully_shard`` copies exactly the written rows.

- Plain parameters: the rank's rows are read by the Rust readers (and cast if the plan says so).
- 4-bit weights: the rank's rows of the packed ``[R, 1]`` tensor are a contiguous element range of the
  flattened weight; it is widened to whole quantization blocks and read and quantized by the Rust
  pipeline (one range job per weight, ``Job.four_bit(..., range=...)``, all submitted at once), and only
  the rank's packed bytes are written. Every rank contributes the absmax of the blocks that start
  in its range; one ``all_gather`` (batched) gives each rank every weight's full absmax, which each rank
  double-quantizes itself (deterministic, so identical everywhere). The ``QuantState`` is full on every
  rank: FSDP does not shard it, and ``Linear4bit`` reads ``module.quant_state``.
- Loaded whole, as without sharing: buffers, tied, transposed and assembled (``pieces``) tensors, and
  pre-quantized weights (logged on the ``fastq`` logger).
- LLM.int8 is refused: ``fully_shard`` replaces ``Int8Params`` by a plain parameter without ``CB`` and
  ``SCB``, and the first forward fails (bitsandbytes issue #1709; tests/test_fsdp.py shows it).

A model loaded this way refuses to run (a forward pre-hook) and ``state_dict()`` (a state-dict pre-hook:
no partial model is saved) until ``fully_shard`` replaced every partial parameter. ``model.fastq_share`` (``ShareStats``) counts what this rank read, wrote and quantized.
"""

from __future__ import annotations

import logging
import math
import mmap
import weakref
from dataclasses import dataclass

import torch

from . import _fastq
from .dtypes import float_input_name
from .errors import ConfigError, PartialShareError, ShapeError
from .install import get_submodule, set_4bit, set_plain
from .placement import fill as fill_whole
from .plan import Entry, Plan
from .progress import byte_bar
from .results import packed_rows, quant_state, raw_bytes

__all__ = ["Share", "ShareStats", "fill", "share_of"]

_log = logging.getLogger("fastq")

#: Float32 absmax values gathered per ``all_gather`` (per rank): 256 MiB, whatever the model's size.
GATHER_FLOATS = 64 << 20


@dataclass(frozen=True)
class Share:
    """This rank's place in the world ``fully_shard`` shards over (the default process group)."""

    rank: int
    world: int

    def rows(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rows ``[start, stop)`` of an ``n``-row parameter that ``rank`` (default: this one) owns."""
        rank = self.rank if rank is None else rank
        c = -(-n // self.world)
        start = min(rank * c, n)
        return start, min(start + c, n)


@dataclass(frozen=True)
class ShareStats:
    """What one rank's ``fastq.load`` did in share mode (``model.fastq_share``).

    Attributes:
        rank: this process's rank.
        world: the world size.
        read_bytes: bytes read from the checkpoint.
        host_bytes: bytes of host memory the model holds from fastq: the rank's rows of every sharded
            parameter, the quant states (full on every rank) and whatever is loaded whole (buffers,
            transposed, assembled and pre-quantized tensors). The untouched rows of the full-size
            parameters are not counted: they are never resident.
        quantized_elements: weight elements quantized by this rank (its ranges widened to whole blocks).
    """

    rank: int
    world: int
    read_bytes: int
    host_bytes: int
    quantized_elements: int


def share_of(shard: bool | None, device_map) -> Share | None:
    """Whether ``fastq.load`` loads this rank's share, and the share.

    Args:
        shard: None (on when torch.distributed is initialized with world size > 1 and ``device_map`` is
            None), True (on; a process group is required), False (off: a full copy per rank).
        device_map: ``fastq.load``'s.

    Raises:
        ConfigError: ``shard=True`` without an initialized process group, or with a device map.
    """
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if shard is None:
        if not on or device_map is not None or dist.get_world_size() == 1:
            return None
    elif shard:
        if not on:
            raise ConfigError("shard=True loads this rank's FSDP share, but torch.distributed is not initialized "
                              "(call torch.distributed.init_process_group first), or pass shard=False")
        if device_map is not None:
            raise ConfigError(f"shard=True builds the model on the CPU for fully_shard; device_map={device_map!r} "
                              "cannot be honoured: leave it None")
    else:
        return None
    return Share(dist.get_rank(), dist.get_world_size())


def fill(model, ckpt, plan: Plan, qcfg, share: Share, progress: bool, threads) -> dict:
    """Places this rank's share of every parameter on the CPU (see the module's docstring), attaches the
    guard and ``model.fastq_share``.

    Returns:
        The offload index (always empty: nothing goes to disk).

    Raises:
        ConfigError: an LLM.int8 config (FSDP2 cannot train ``Linear8bitLt``).
    """
    if qcfg is not None and qcfg.is_8bit:
        raise ConfigError(
            "LLM.int8 does not train under FSDP2: fully_shard replaces Int8Params by a plain parameter and "
            "Linear8bitLt's forward then fails ('Parameter' object has no attribute 'CB'; bitsandbytes issue "
            "#1709). Use 4-bit with bnb_4bit_quant_storage=torch.bfloat16, or shard=False for a full copy "
            "on every rank"
        )
    rows, fourbit, whole = _split(model, plan)
    pre = [e for e in whole if e.kind in ("4bit-pre", "int8-pre")]
    if pre:
        _log.info("%s: pre-quantized weights (%d, e.g. %s) are loaded whole on every rank in FSDP share mode; "
                  "fully_shard keeps this rank's rows of each", ckpt.path, len(pre), pre[0].name)
    counts = _Counts()
    bar = byte_bar(sum(e.nbytes for e in plan.entries) // share.world, "fastq.load", disable=not progress)
    try:
        if whole:
            fill_whole(model, ckpt, Plan(whole, [], []), {"": "cpu"}, qcfg, None, False, threads)
            for e in whole:
                counts.read += e.nbytes + sum(ckpt.meta(s).nbytes for s in e.extra.values())
                counts.host += _held_bytes(model, e)
                if e.kind == "4bit":
                    counts.quantized += math.prod(ckpt.meta(e.source).shape)
                bar.update(e.nbytes // share.world)
        partial: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        spec = qcfg.spec if qcfg else None
        # The 4-bit weights' pipeline starts first: the plain rows are read while it quantizes.
        made, pending, results = _start_4bit(ckpt, fourbit, spec, share, threads, bar)
        reader = _fastq.Reader(ckpt.native, threads)
        for e in rows:
            p = _fill_rows(model, ckpt, reader, e, share, counts)
            partial[id(p)] = p
            bar.update(e.nbytes // share.world)
        for p in _finish_4bit(model, made, pending, results, spec, share, counts, threads, bar):
            partial[id(p)] = p
    finally:
        bar.close()
    # The range jobs' result buffers were copied out and freed; mimalloc would keep them for reuse (35-60
    # MiB more anonymous memory per rank after fully_shard on BENCHMARKS.md's 0.5 GiB model).
    _fastq.release_memory()
    if share.world > 1:
        _guard(model, share, partial)
    model.fastq_share = ShareStats(share.rank, share.world, counts.read, counts.host, counts.quantized)
    return {}


@dataclass
class _Counts:
    read: int = 0
    host: int = 0
    quantized: int = 0


def _split(model, plan: Plan) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(plain parameters read by rows, 4-bit weights quantized by rows, entries loaded whole)."""
    from .experts import QuantizedExperts

    rows, fourbit, whole = [], [], []
    for e in plan.entries:
        if e.kind == "tied":
            continue  # dispatch.finalize ties it to its first name's parameter
        module = get_submodule(model, e.module)
        leaf = e.name.rpartition(".")[2]
        by_rows = not e.transpose and not e.pieces and not isinstance(module, QuantizedExperts)
        if e.kind == "plain" and by_rows and leaf in module._parameters and module._parameters[leaf].dim() > 0:
            rows.append(e)
        elif e.kind == "4bit" and by_rows:
            fourbit.append(e)
        else:
            whole.append(e)
    return rows, fourbit, whole


def _anonymous(nbytes: int) -> tuple[object, torch.Tensor]:
    """A writable byte tensor over an anonymous mapping: zero pages until written, so the rows this rank
    does not own are never resident (torch.empty may hand back touched heap memory, zeros touches all)."""
    if nbytes == 0:
        return bytearray(), torch.empty(0, dtype=torch.uint8)
    # Private: Python's default for -1 is MAP_SHARED, shared memory (RssShmem, inherited by forks).
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)  # a huge page would make a partly written 2 MiB resident whole
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _read(reader, src: str, offset: int, nbytes: int, dst, at: int = 0) -> None:
    if nbytes:
        reader.submit([(src, offset, nbytes, at)], dst).wait()


def _fill_rows(model, ckpt, reader, e: Entry, share: Share, counts: _Counts) -> torch.Tensor:
    """A plain parameter, full size, holding only this rank's rows (cast to ``e.dtype`` if it differs)."""
    meta = ckpt.meta(e.source)
    src_dtype, shape = meta.torch_dtype, meta.shape
    dtype = e.dtype or src_dtype
    per_row = math.prod(shape[1:])
    r0, r1 = share.rows(shape[0])
    src_row, dst_row = per_row * src_dtype.itemsize, per_row * dtype.itemsize
    mm, raw = _anonymous(math.prod(shape) * dtype.itemsize)
    n = r1 - r0
    if dtype == src_dtype:
        _read(reader, e.source, r0 * src_row, n * src_row, mm, r0 * dst_row)
    elif n:
        tmp = torch.empty(n * src_row, dtype=torch.uint8)
        _read(reader, e.source, r0 * src_row, n * src_row, tmp.numpy())
        raw[r0 * dst_row : r1 * dst_row].view(dtype).copy_(tmp.view(src_dtype))
    counts.read += n * src_row
    counts.host += n * dst_row
    set_plain(model, e.name, raw.view(dtype).view(shape), "cpu")
    return get_submodule(model, e.module)._parameters[e.name.rpartition(".")[2]]


@dataclass
class _Weight4:
    """One 4-bit weight in the making: its packed bytes (this rank's rows written) and absmax pieces."""

    entry: Entry
    shape: tuple[int, ...]
    dtype: torch.dtype
    packed: torch.Tensor
    own: torch.Tensor  # float32 absmax of the blocks that start in this rank's element range
    counts: list[int]  # blocks each rank contributes


def _elements(share: Share, rows: int, per_row: int, n: int, rank: int) -> tuple[int, int]:
    """The flattened weight's elements that ``rank``'s packed rows hold."""
    r0, r1 = share.rows(rows, rank)
    return min(r0 * per_row, n), min(r1 * per_row, n)


@dataclass
class _Range:
    """One range job's place: the weight, its packed bytes, its rows and its element ranges."""

    weight: _Weight4
    raw: torch.Tensor  # the packed bytes as uint8, over the anonymous mapping
    rows: tuple[int, int]  # this rank's rows of the packed [R, 1] tensor
    elements: tuple[int, int]  # the flattened weight's elements those rows hold
    blocks: tuple[int, int]  # the elements quantized: ``elements`` widened to whole blocks
    item: int  # bytes per element of the checkpoint tensor


def _start_4bit(ckpt, entries: list[Entry], spec, share: Share, threads, bar) -> tuple[list, list, object]:
    """Sizes every 4-bit weight's packed tensor and starts the Rust pipeline on this rank's range of each.

    The rank's element range of a weight, widened to whole blocks, is one range job
    (``Job.four_bit(..., range=...)``); all of them go to the pipeline at once (reads and quantization
    overlapped on every core; ``_finish_4bit`` consumes the results as they come).

    Returns:
        ``(weights, ranges, results)``: every ``_Weight4``, the ``_Range`` of each job in job order, and
        the results' iterator (``Checkpoint.quantize``'s).

    Raises:
        ShapeError: a weight whose packed bytes cannot be viewed as the quant storage dtype.
    """
    if not entries:
        return [], [], iter(())
    bs, item = spec.blocksize, spec.quant_storage.itemsize
    per_row = 2 * item  # 4-bit elements per packed row of the [R, 1] tensor
    made, jobs, pending = [], [], []
    for e in entries:
        meta = ckpt.meta(e.source)
        n, src_dtype = math.prod(meta.shape), meta.torch_dtype
        nbytes = (n + 1) // 2
        try:
            rows = packed_rows(nbytes, spec.quant_storage)
        except ShapeError as e:
            raise ShapeError(f"{meta.file}: '{meta.name}': {e}", path=meta.file, tensor=meta.name) from None
        e0, e1 = _elements(share, rows, per_row, n, share.rank)
        _, raw = _anonymous(nbytes)
        per_rank = [-(-b // bs) - -(-a // bs) for a, b in
                    (_elements(share, rows, per_row, n, k) for k in range(share.world))]
        packed = raw.view(spec.quant_storage).view(rows, 1)
        w = _Weight4(e, meta.shape, e.dtype or src_dtype, packed, torch.empty(0, dtype=torch.float32), per_rank)
        made.append(w)
        if e1 > e0:
            q0, q1 = e0 // bs * bs, min(-(-e1 // bs) * bs, n)  # widened to whole blocks
            cast = float_input_name(e.dtype) if e.dtype not in (None, src_dtype) else None
            jobs.append(_fastq.Job.four_bit(e.source, spec.quant_type, bs, double_quant=False, cast=cast,
                                            range=(q0, q1)))
            pending.append(_Range(w, raw, share.rows(rows), (e0, e1), (q0, q1), src_dtype.itemsize))
        else:
            bar.update(e.nbytes // share.world)
    return made, pending, ckpt.quantize(jobs, threads=threads)


def _finish_4bit(model, made: list, pending: list, results, spec, share: Share, counts: _Counts, threads,
                 bar) -> list:
    """Writes this rank's packed rows of every range result as it comes, gathers the absmax, installs
    each weight (full ``QuantState``, double-quantized here when the config asks).

    Returns:
        The installed (partial) weights.
    """
    if not made:
        return []
    bs, item = spec.blocksize, spec.quant_storage.itemsize
    for r, (_, (sub, st)) in zip(pending, results, strict=True):
        (r0, r1), (e0, e1), (q0, q1) = r.rows, r.elements, r.blocks
        # Copied with numpy, on this thread: a torch copy would start its OpenMP team while the pipeline's
        # rayon workers hold every core, and oversubscribed OpenMP spins (on 2 cores the copies took
        # 1.1 s for the 0.5 GiB model of benches/bench_share_load.py, against 0.09 s this way).
        skip = q0 // 2  # packed bytes before this rank's first block
        r.raw.numpy()[r0 * item : r1 * item] = sub.view(-1).view(torch.uint8).numpy()[r0 * item - skip :
                                                                                       r1 * item - skip]
        r.weight.own = torch.from_numpy(st.absmax.numpy()[-(-e0 // bs) - q0 // bs : -(-e1 // bs) - q0 // bs].copy())
        counts.read += (q1 - q0) * r.item
        counts.host += (r1 - r0) * item
        counts.quantized += q1 - q0
        bar.update(r.weight.entry.nbytes // share.world)
    out = []
    for group in _batches(made):
        for w, absmax in zip(group, _gather(group, share)):
            nested = _fastq.quantize_nested(raw_bytes(absmax), threads) if spec.double_quant else None
            state = quant_state(w.shape, w.dtype, bs, spec.quant_type, None if nested else absmax, nested)
            module = get_submodule(model, w.entry.module)
            set_4bit(module, w.packed, state, "cpu")
            counts.host += _state_bytes(state)
            out.append(module.weight)
    return out


def _batches(made: list[_Weight4]) -> list[list[_Weight4]]:
    """Weights grouped so that one gather moves at most ``GATHER_FLOATS`` floats per rank."""
    groups, cur, size = [], [], 0
    for w in made:
        if cur and size + max(w.counts) > GATHER_FLOATS:
            groups.append(cur)
            cur, size = [], 0
        cur.append(w)
        size += max(w.counts)
    return groups + [cur] if cur else groups


def _gather(group: list[_Weight4], share: Share) -> list[torch.Tensor]:
    """Every weight's full absmax from each rank's pieces: one all_gather of padded concatenations."""
    import torch.distributed as dist

    if share.world == 1:
        return [w.own for w in group]
    totals = [sum(w.counts[k] for w in group) for k in range(share.world)]
    width = max(totals)
    # NCCL gathers device tensors; gloo (and the CPU half of "cpu:gloo,cuda:nccl") host ones.
    backend = str(dist.get_backend())
    device = torch.device("cpu") if "gloo" in backend or "mpi" in backend else torch.device(
        "cuda", torch.cuda.current_device())
    mine = torch.zeros(width, dtype=torch.float32)
    if group:
        cat = torch.cat([w.own for w in group])
        mine[: cat.numel()] = cat
    outs = [torch.empty(width, dtype=torch.float32, device=device) for _ in range(share.world)]
    dist.all_gather(outs, mine.to(device))
    outs = [o.cpu() for o in outs]
    full = []
    at = [0] * share.world
    for w in group:
        parts = []
        for k in range(share.world):
            parts.append(outs[k][at[k] : at[k] + w.counts[k]])
            at[k] += w.counts[k]
        full.append(torch.cat(parts))
    return full


def _state_bytes(state) -> int:
    """Bytes of a QuantState's tensors (absmax, code, offset, and the nested state's)."""
    total = 0
    for s in (state, state.state2) if state.nested else (state,):
        for t in (s.absmax, s.code, getattr(s, "offset", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def _held_bytes(model, e: Entry) -> int:
    """Bytes of host memory the model holds for an entry loaded whole."""
    module = get_submodule(model, e.module)
    leaf = e.name.rpartition(".")[2]
    t = module._parameters.get(leaf)
    if t is None:
        t = module._buffers.get(leaf)
    if t is None:
        return 0
    total = t.nbytes
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += _state_bytes(state)
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.nbytes
    return total


def _guard(model, share: Share, partial: weakref.WeakValueDictionary) -> None:
    """Hooks on the root that refuse a forward (a forward pre-hook) and ``state_dict()`` (a state-dict
    pre-hook, so that a partial model is never saved, by ``save_pretrained`` or otherwise) while a
    parameter still holds only this rank's rows: ``fully_shard`` replaces each by its sharded copy; once
    none is left both hooks remove themselves. Neither ``peft.get_peft_model`` nor ``fully_shard`` calls
    ``state_dict()`` (tests/fsdp_worker.py wraps a share model in both)."""
    from torch.distributed.fsdp import FSDPModule

    def refuse(module, what: str) -> None:
        if isinstance(module, FSDPModule) or not any(partial.get(id(p)) is p for p in module.parameters()):
            for h in handles:
                h.remove()
            return
        raise PartialShareError(
            f"{what}: this model holds only rank {share.rank} of {share.world}'s share of each weight: wrap it "
            "with torch.distributed.fsdp.fully_shard (each decoder layer, then the root) before use, or load "
            "with shard=False"
        )

    handles = [
        model.register_forward_pre_hook(lambda module, args: refuse(module, "forward refused")),
        model.register_state_dict_pre_hook(
            lambda module, prefix, keep_vars: refuse(module, "state_dict() refused (a partial model cannot be "
                                                     "saved)")),
    ]
