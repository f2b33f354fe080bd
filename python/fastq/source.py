"""Where a checkpoint's config and weights are (``Source``), and its config.json read with errors that
name the file: empty, not JSON, not an object, a ``quantization_config`` that is not an object or is
another library's. The first thing ``fastq.load``, ``convert`` and ``inspect`` do, and torch-free, so
``fastq inspect`` can report on a checkpoint without importing torch.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
from pathlib import Path

from .errors import ConfigFileError, FastqIOError, MissingFileError

__all__ = [
    "QUANT_METHOD",
    "Source",
    "config_dtype_name",
    "quant_method",
    "quantization_method",
    "read_config",
    "require_bitsandbytes",
    "saved_quantization",
    "transformers_reads_config_dtype",
]

#: The ``quant_method`` of the checkpoints fastq reads and writes (transformers' ``QuantizationMethod``).
QUANT_METHOD = "bitsandbytes"


def _error(path: Path, message: str) -> ConfigFileError:
    return ConfigFileError(f"{path}: {message}", path=path)


def _not_a_file(path: Path, expected: str) -> FastqIOError:
    e = FastqIOError(f"{path}: a folder, where {expected} is expected", path=path)
    e.errno = errno.EISDIR
    return e


class Source:
    """Where the config and the weights are: a folder (its ``config.json`` and safetensors) or one
    safetensors file (its folder's config.json, if any).

    Raises:
        MissingFileError: the path does not exist, or is an empty folder.
        FastqIOError: a folder stands where config.json or a safetensors file should be.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.exists():
            raise MissingFileError(f"{p}: no such file or folder")
        if p.is_dir() and next(p.iterdir(), None) is None:
            raise MissingFileError(f"{p}: the folder is empty; expected config.json and safetensors weights")
        self.path = p
        self.folder = p if p.is_dir() else p.parent
        self.weights = p
        config = self.folder / "config.json"
        if config.is_dir():
            raise _not_a_file(config, "the model's config (a JSON file)")
        if p.is_dir():
            for q in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.safetensors.index.json")):
                if q.is_dir():
                    raise _not_a_file(q, "a safetensors file" if q.suffix == ".safetensors" else "an index file")
        self.config_path = config if config.is_file() else None

    def raw_config(self) -> dict:
        """config.json as a dict (empty without one); see ``read_config``."""
        return read_config(self.config_path) if self.config_path else {}


def read_config(path: Path) -> dict:
    """A config.json as a dict.

    Raises:
        ConfigFileError: the file is empty, not UTF-8 JSON, or not a JSON object.
        PermissionError: it cannot be read (the error names the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _error(path, f"not UTF-8 text (byte {e.start}); expected the model's config as JSON") from None
    except IsADirectoryError:
        raise _not_a_file(path, "the model's config (a JSON file)") from None
    if not text.strip():
        raise _error(path, "the file is empty; expected the model's config (a JSON object)")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, f"not valid JSON: {e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(raw, dict):
        raise _error(path, f"holds a JSON {_json_kind(raw)}; expected the model's config (a JSON object)")
    return raw


def saved_quantization(raw: dict, path: Path | None) -> dict | None:
    """The ``quantization_config`` of a config.json (None when absent, null or empty).

    Raises:
        ConfigFileError: it is not a JSON object (a string, a list, a number).
    """
    q = raw.get("quantization_config")
    if q is None or q == {}:
        return None
    if not isinstance(q, dict):
        raise _error(
            path or Path("config.json"),
            f"quantization_config is a JSON {_json_kind(q)} ({_short(q)}); expected an object such as "
            f'{{"quant_method": "{QUANT_METHOD}", "load_in_4bit": true, ...}}',
        )
    return q


def quant_method(q: dict) -> str:
    """The ``quant_method`` of a ``quantization_config`` (``"bitsandbytes"`` when it has none, as
    transformers reads it)."""
    method = q.get("quant_method", QUANT_METHOD)
    return str(getattr(method, "value", method))


def quantization_method(q: dict) -> str:
    """``"llm_int8"``, ``"nf4"`` or ``"fp4"``: ``QuantConfig.from_dict(q).quantization_method()`` of a
    bitsandbytes ``quantization_config``, read without torch (and without validating it)."""
    eight = q.get("load_in_8bit", q.get("_load_in_8bit", False))
    return "llm_int8" if eight is True else str(q.get("bnb_4bit_quant_type", "fp4"))


def require_bitsandbytes(q: dict, path: Path | None) -> None:
    """Raises ``ConfigFileError`` when ``q`` is another library's quantization (GPTQ, AWQ, ...)."""
    method = quant_method(q)
    if method != QUANT_METHOD:
        raise _error(
            path or Path("config.json"),
            f"quantization_config has quant_method {method!r}: the checkpoint is quantized with {method}, "
            "and fastq handles bitsandbytes (4-bit NF4/FP4 and LLM.int8) checkpoints only",
        )


def transformers_reads_config_dtype() -> bool:
    """Whether the installed transformers' ``from_pretrained`` builds the model in config.json's dtype when
    no ``dtype=`` is given (transformers 5: ``dtype = "auto"``) rather than torch's default (transformers 4;
    modeling_utils.py, ``from_pretrained``). Read from the package's metadata, without importing it."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return True  # what the current transformers does; the load itself will say it is missing
    return int(version.split(".")[0]) >= 5


def config_dtype_name(raw: dict) -> str:
    """The dtype a config.json asks for (``dtype``, older ``torch_dtype``; ``"float32"`` without one), as
    ``from_pretrained(dtype="auto")`` reads it."""
    return str(raw.get("dtype") or raw.get("torch_dtype") or "float32")


def _json_kind(value) -> str:
    kinds = {str: "string", list: "list", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
