"""One function process never holds more database connections than its pool cap.

The connection budget of the deployments (docs/deploy-aws.md, docs/deploy-gcp.md) multiplies
instances x processes x (DB_POOL_SIZE + DB_POOL_OVERFLOW): it holds only if each process keeps
to its cap under load, the fast path (one autocommitted statement per request) included.
get_record runs here with a small pool and many more server threads than connections, takes
far more concurrent requests than its cap, and PostgreSQL's own view (pg_stat_activity, by the
process's application_name) is sampled throughout.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
from common.adapters.db import sql
from common.platform.runtime import Services

from devstack import ScratchStack, wavgen
from tests.support import Client

POOL_SIZE, POOL_OVERFLOW = 2, 1
CAP = POOL_SIZE + POOL_OVERFLOW
THREADS = 16
REQUESTS = 240
CONNECTIONS_OF = sql(
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
)  # fmt: skip


def test_a_process_holds_at_most_its_pool_cap(
    client: Client, stack: ScratchStack, services: Services
) -> None:
    user = client.create_user("Budget")
    record = client.upload(user, wavgen.wav(seconds=0.2)).json()
    name = f"budget-{uuid.uuid4().hex[:8]}"
    stack.restart_function(
        "get_record",
        {
            "DATABASE_URL": f"{stack.database_tcp_url()}?application_name={name}",
            "DB_POOL_SIZE": str(POOL_SIZE),
            "DB_POOL_OVERFLOW": str(POOL_OVERFLOW),
            "WORKERS": "1",
            "THREADS": str(THREADS),
        },
    )
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(services.db.execute(CONNECTIONS_OF, {"name": name})[0][0])

    # Straight to the function's port: the router's rate limit is not under test.
    url = f"http://127.0.0.1:{stack.ports.get_record}/record?id={record['id']}&user={user['id']}"

    def get(_: int) -> int:
        with requests.Session() as session:
            return session.get(url, timeout=60).status_code

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=4 * THREADS) as pool:
            statuses = list(pool.map(get, range(REQUESTS)))
    finally:
        done.set()
        sampler.join()
        stack.restart_function("get_record")
    assert statuses == [200] * REQUESTS
    assert max(seen) >= 1, "the sampler never saw the process's connections"
    assert max(seen) <= CAP, f"{max(seen)} connections, pool cap {CAP}"
