"""``make bench``: the service's figures, measured on a native stack of its own through nginx.

``python -m bench`` starts the stack (:mod:`devstack.scratch`), runs each measurement with
warm-up and counted rounds, and prints a table (figure, target, ratio, met?) that it also
writes to ``bench/results.md`` with the machine and its load. The figures: 1 upload against
bare ffmpeg, 2 memory, 3 two uploads at once (:mod:`bench.uploads`); 4 small requests, 5 their
slowest while a WAV converts (:mod:`bench.small`); 6 image size and cold start
(:mod:`bench.images`); 7 voice notes (:mod:`bench.voice_notes`); 8 slow clients
(:mod:`bench.slow_clients`); 9 cold starts under the Lambda emulator (:mod:`bench.cold_starts`).
``--smoke`` runs every step tiny: it proves the command works. docs/performance.md explains
each figure."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
