"""Bucket setup, run once before the functions start: ``python -m common.ops.bucket``.

Creates the bucket if it is missing and installs the lifecycle rules: one removes multipart
uploads a crashed conversion left incomplete, the other expires direct uploads
(``uploads/``, see :mod:`common.domain.uploads`) that were never completed. Safe to run again.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from common.domain.uploads import PENDING_PREFIX
from common.platform.logs import configure_logging
from common.platform.runtime import make_storage
from common.settings import get_settings

log = logging.getLogger("common.ops.bucket")

ABORT_INCOMPLETE_AFTER_DAYS = 1
EXPIRE_PENDING_UPLOADS_AFTER_DAYS = 1
# The one statement of the bucket's lifecycle, in S3's shape. The clouds' copies (infra/aws,
# infra/gcp/bucket-lifecycle.json) are checked against it by tests/unit/test_infra.py.
LIFECYCLE_RULES: list[dict[str, Any]] = [
    {
        "ID": "abort-incomplete-uploads",
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_AFTER_DAYS},
    },
    {
        "ID": "expire-abandoned-direct-uploads",
        "Status": "Enabled",
        "Filter": {"Prefix": PENDING_PREFIX},
        "Expiration": {"Days": EXPIRE_PENDING_UPLOADS_AFTER_DAYS},
    },
]


def main() -> int:
    configure_logging()
    settings = get_settings()
    make_storage(settings).ensure_bucket(LIFECYCLE_RULES)
    log.info("bucket %s is ready", settings.s3_bucket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
