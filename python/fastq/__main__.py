"""``python -m fastq``: the ``fastq`` command (see ``fastq.cli``)."""

import sys

from .cli import main

sys.exit(main())
