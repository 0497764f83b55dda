"""``make bench``: the service's performance figures, measured on the native stack through nginx.

``python -m bench`` starts its own stack (:mod:`devstack.scratch`: a temporary directory, free
ports, the stack's default server settings), then measures, with warm-up and counted rounds:

1. upload latency: POST of a 10-minute 44.1 kHz stereo WAV to its 201 (sent by curl, as in the
   README), against the bare ``ffmpeg -f wav -i in.wav -c:a libmp3lame -b:a 192k out.mp3`` of
   the same file, same run (:mod:`bench.uploads`);
2. memory: the upload function's process tree (server, workers, ffmpeg) sampled with psutil
   while it converts a small and a 1 GiB WAV, streamed from a generator, never on disk;
3. throughput: two uploads at once against one;
4. small requests: POST /users and a 1 MB GET /record with wrk (32 connections, bounded in
   time and requests, 127.0.0.1 only; five rounds of each, figures are medians of rounds;
   :mod:`bench.small`);
5. stalls: the slowest POST /users and GET /record while a 10-minute WAV converts;
6. voice notes: 5-s clips uploaded 4 at a time against bare ffmpeg (:mod:`bench.voice_notes`);
7. image size and cold start: ``scripts/image_report.py`` on the compose stack, when it is up
   (:mod:`bench.images`).

It prints a table (figure, target, ratio, met?) and writes it to ``bench/results.md`` with the
machine it ran on and how busy the machine was with other work (:mod:`bench.report`).
``--smoke`` runs every step with tiny sizes in a few seconds each (CI proves the command
works; its figures mean nothing).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
