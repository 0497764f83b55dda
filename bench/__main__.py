"""``python -m bench`` (``make bench``, ``make bench-smoke``)."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
