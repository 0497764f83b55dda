"""``make bench``: the service's figures, measured on a native stack of its own through nginx.

``python -m bench`` starts the stack (:mod:`devstack.scratch`), runs each step of
:mod:`bench.run` with warm-up and counted rounds, and prints a table (figure, target, ratio,
met?) that it also writes to ``bench/results.md``. One module per group of figures:
:mod:`bench.uploads`, :mod:`bench.small`, :mod:`bench.images`, :mod:`bench.voice_notes`,
:mod:`bench.slow_clients`, :mod:`bench.cold_starts`. ``--smoke`` runs every step tiny, to prove
the command works. docs/performance.md explains each figure.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
