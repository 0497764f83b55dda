#!/bin/sh
# Compose stack only: mounted into the nginx image's /docker-entrypoint.d/, which runs it
# before nginx starts. nginx resolves the upstream host names of router.conf.template once,
# when it loads its configuration; this watcher reloads nginx whenever the addresses behind
# them change, so `docker compose up --scale upload_record=3` (or a recreated function)
# is picked up and requests are spread over every replica.
#   UPSTREAM_HOSTS         names to watch, space-separated (empty: do nothing)
#   UPSTREAM_WATCH_SECONDS how often to look (default 2)
set -eu
hosts="${UPSTREAM_HOSTS:-}"
[ -n "$hosts" ] || exit 0
interval="${UPSTREAM_WATCH_SECONDS:-2}"

addresses() {
    for host in $hosts; do
        printf '%s=' "$host"
        getent ahostsv4 "$host" | awk '{ print $1 }' | sort -u | tr '\n' ','
        printf ' '
    done
}

(
    seen="$(addresses)"
    while sleep "$interval"; do
        now="$(addresses)"
        [ "$now" = "$seen" ] && continue
        if [ -s /run/nginx.pid ] || [ -s /var/run/nginx.pid ]; then
            echo "upstream addresses changed: $now; reloading nginx" >&2
            nginx -s reload && seen="$now"
        fi
    done
) </dev/null &
