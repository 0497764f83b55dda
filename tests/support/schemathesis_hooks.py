"""Schemathesis hooks for the contract test (loaded through SCHEMATHESIS_HOOKS).

Raw ``audio/wav`` bodies (POST /records) are bytes, sent as they are.
"""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias("audio/wav", "application/octet-stream")
