"""The record service without Docker: ``make dev``, and the stacks of the tests and the bench.

:mod:`devstack.native` starts PostgreSQL, SeaweedFS, the functions, the worker and nginx;
:mod:`devstack.scratch` runs the same stack on free ports in a temporary directory;
:mod:`devstack.wavgen` builds WAV files; :mod:`devstack.ffmpeg` builds the minimal ffmpeg.
"""

from devstack.native import FUNCTIONS, NativeStack, Ports, StackError, port_free
from devstack.scratch import ScratchStack, free_port, free_ports, make_data_dir

__all__ = [
    "FUNCTIONS",
    "NativeStack",
    "Ports",
    "ScratchStack",
    "StackError",
    "free_port",
    "free_ports",
    "make_data_dir",
    "port_free",
]
