"""Other libraries' log messages that fastq filters where it runs, each one by its text.

bitsandbytes 0.50 logs a warning on every import on a CPU with AVX512-BF16 when the optional ``kernels``
package is missing: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
'kernels'. Please make sure you already `pip install kernels` ..." (bitsandbytes/backends/cpu/ops.py,
``logger.warning`` on the module's logger). Every ``fastq convert`` printed it, though converting never
runs that kernel, and so did every ``fastq.load`` and ``fastq.ops`` call. ``quiet_bitsandbytes`` (run by
``import fastq``) drops that one message from that one logger; anything else bitsandbytes logs goes
through.
"""

from __future__ import annotations

import logging

__all__ = ["BNB_CPU_LOGGER", "BNB_KERNELS_MESSAGE", "quiet_bitsandbytes"]

#: The logger bitsandbytes' CPU backend logs with (``logging.getLogger(__name__)``).
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
#: How the dropped message starts (its format string, before the import error is filled in).
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_MESSAGE)


def quiet_bitsandbytes() -> None:
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning; a
    no-op when already done. Effective for an import of bitsandbytes that comes after it (the warning is
    logged while bitsandbytes is imported)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsMessage) for f in logger.filters):
        logger.addFilter(_DropKernelsMessage())
