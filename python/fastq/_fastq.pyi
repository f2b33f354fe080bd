"""Type stubs of the Rust extension ``fastq._fastq`` (rust/py/src). Kept by hand; tests/test_stubs.py
checks that every name and signature here matches the built module."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeAlias, final

__version__: str

# A job of Checkpoint.quantize: (name, kind, quant_type, blocksize, double_quant, transpose, cast dtype).
QuantJob: TypeAlias = tuple[str, Literal["4bit", "int8"], str, int, bool, bool, str | None]
# A 4-bit result: kind, quant_type, blocksize, shape, dtype, codes, absmax | None, nested_codes | None,
# nested_absmax, offset; an int8 result: kind, shape, CB, SCB.
Result: TypeAlias = dict[str, Any]

@final
class Buffer:
    """Rust-owned bytes exposed through the buffer protocol (wrap with torch.frombuffer)."""

    @property
    def address(self) -> int: ...
    def __len__(self) -> int: ...

@final
class Checkpoint:
    def __new__(cls, path: str) -> Checkpoint: ...
    def tensors(self) -> list[tuple[str, str, list[int], str, int]]: ...
    def shard_paths(self) -> list[str]: ...
    def metadata(self, i: int) -> dict[str, str]: ...
    def get(self, name: str) -> Buffer: ...
    def populate(self, names: Sequence[str], threads: int | None = None) -> None: ...
    def total_bytes(self) -> int: ...
    def quantize(
        self,
        jobs: Sequence[QuantJob],
        threads: int | None = None,
        batch_bytes: int | None = None,
        channel_capacity: int | None = None,
        release_pages: bool = True,
    ) -> QuantizeIter: ...

@final
class QuantizeIter(Iterator[tuple[str, Result]]):
    def __iter__(self) -> QuantizeIter: ...
    def __next__(self) -> tuple[str, Result]: ...
    def close(self) -> None: ...

@final
class Reader:
    """Reader threads over one checkpoint: positioned reads into a caller's buffer (the pinned ring)."""

    def __new__(cls, checkpoint: Checkpoint, threads: int | None = None) -> Reader: ...
    def submit(self, pieces: Sequence[tuple[str, int, int, int]], dst: Any) -> ReadTicket: ...

@final
class ReadTicket:
    """One submitted read; holds the destination until the read finished."""

    def wait(self) -> None: ...
    def times(self) -> tuple[float, float]: ...
    def done(self) -> bool: ...

def quantize_4bit(
    data: Any,
    dtype: str,
    shape: Sequence[int],
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    threads: int | None = None,
    reference: bool = False,
) -> Result: ...
def quantize_int8(
    data: Any, dtype: str, shape: Sequence[int], threads: int | None = None, reference: bool = False
) -> Result: ...
def quantize_nested_blockwise(data: Any) -> tuple[Buffer, Buffer]: ...
def kernel_name() -> str: ...
def thread_count(threads: int | None = None) -> int: ...
def dynamic_map() -> list[float]: ...
def code_4bit(quant_type: str) -> list[float]: ...
def plan_layout(
    src: str, jobs: Sequence[tuple[Any, ...]], outputs: Sequence[tuple[Any, ...]], max_shard_size: int
) -> list[tuple[str, list[tuple[str, str, list[int], int, bool]]]]: ...
def convert(
    src: str,
    out_dir: str,
    jobs: Sequence[tuple[Any, ...]],
    outputs: Sequence[tuple[Any, ...]],
    max_shard_size: int,
    params_json: str,
    resume: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    progress: Callable[[int, int, int, int, int], object] | None = None,
    interval: float = 0.2,
) -> dict[str, Any] | None: ...
def py_float_repr(x: float) -> str: ...
def quant_state_json(
    quant_type: str, blocksize: int, dtype_name: str, shape: Sequence[int], nested_offset: float | None = None
) -> str: ...
