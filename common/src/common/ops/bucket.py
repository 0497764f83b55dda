"""Bucket setup, run once before the functions start: ``python -m common.ops.bucket``.

Creates the bucket if it is missing and installs the lifecycle rules: one removes multipart
uploads a crashed conversion left incomplete, the other expires direct uploads
(``uploads/``, see :mod:`common.domain.uploads`) that were never completed. Safe to run again.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from common.adapters.storage import make_s3_client
from common.domain.uploads import PENDING_PREFIX
from common.platform.logs import configure_logging
from common.settings import get_settings

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import LifecycleRuleTypeDef

log = logging.getLogger("common.ops.bucket")

ABORT_INCOMPLETE_AFTER_DAYS = 1
EXPIRE_PENDING_UPLOADS_AFTER_DAYS = 1
# The one statement of the bucket's lifecycle. The clouds' copies (infra/aws/template.yaml,
# infra/gcp/bucket-lifecycle.json) are checked against it by tests/unit/test_infra.py.
LIFECYCLE_RULES: list[LifecycleRuleTypeDef] = [
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


def ensure_bucket(attempts: int = 30) -> None:
    settings = get_settings()
    client = make_s3_client(settings)
    bucket = settings.s3_bucket
    for attempt in range(attempts):
        try:
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
                client.create_bucket(Bucket=bucket)
                log.info("created bucket %s", bucket)
            break
        except (BotoCoreError, ClientError) as exc:
            if attempt == attempts - 1:
                raise
            log.info("object store not ready (%s); retrying", exc)
            time.sleep(1)
    try:
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": LIFECYCLE_RULES}
        )
    except ClientError as exc:  # some stores have no lifecycle API: `make sweep` covers them
        log.warning("could not set the bucket lifecycle rule: %s", exc)


def main() -> int:
    configure_logging()
    ensure_bucket()
    log.info("bucket %s is ready", get_settings().s3_bucket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
