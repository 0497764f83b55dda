"""One adapter per outside system: PostgreSQL, the object store, the job queues, secrets, OIDC."""
