#!/usr/bin/env bash
# make deploy-gcp: build the images, push them to Artifact Registry, and roll out in the safe
# order: accounts and bucket, secrets, the Cloud Tasks queue, the migrations (a Cloud Run job
# on the new image, executed and waited for), then the Cloud Run services (infra/gcp/*.yaml),
# the scheduled sweep (Cloud Run job + Cloud Scheduler), the HTTPS load balancer with Cloud
# Armor in front (infra/gcp/url-map.yaml, http-redirect.yaml) and the Cloud Monitoring alert
# policies (infra/gcp/alerts/*.yaml, the AWS template's alarms). Safe to run again.
# docs/deploy-gcp.md explains each step.
#
# Needs: docker (with buildx), gcloud signed in with a project you own, and a Cloud SQL for
# PostgreSQL instance with a database and user. Required (the script refuses to start, naming
# the value, while one is missing or still a placeholder):
#   PROJECT_ID          Google Cloud project
#   REGION              region of Cloud Run, Artifact Registry, the bucket and the queue
#   CLOUDSQL_INSTANCE   PROJECT:REGION:INSTANCE connection name
#   DATABASE_URL        postgresql://records:<password>@/records?host=/cloudsql/PROJECT:REGION:INSTANCE
#                       (stored in Secret Manager, never printed)
#   DB_MAX_CONNECTIONS  the instance's max_connections (db-f1-micro 25, db-g1-small 50 ...)
#   DOMAIN              the DNS name for the managed certificate (not with HTTP_ONLY=1)
# Optional:
#   HTTP_ONLY=1         serve plain HTTP without a certificate (explicit; tests and demos only)
#   BUCKET ($PROJECT_ID-records), REPOSITORY (records), IMAGE_TAG (git short hash),
#   DOWNLOAD_MODE (redirect), MAX_UPLOAD_BYTES (31457280), MAX_DIRECT_UPLOAD_BYTES,
#   MAX_INSTANCES_CREATE_USER (2), MAX_INSTANCES_UPLOAD_RECORD (3), MAX_INSTANCES_GET_RECORD (3),
#   DB_POOL_SIZE_CREATE_USER (4), DB_POOL_SIZE_UPLOAD_RECORD (2), DB_POOL_SIZE_GET_RECORD (4),
#   DB_HEADROOM (5), RATE_LIMIT_RPS (100), RATE_LIMIT_BURST (300), SWEEP_SCHEDULE (hourly)
#   ALARM_EMAIL         address notified by the alert policies (an email notification channel;
#                       unset: incidents show in the console only, channels already set are kept)
#   DRY_RUN=1           print the steps instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
require() {  # require NAME...: set, and not a placeholder from the docs
    local name value
    for name in "$@"; do
        value=${!name:-}
        if [[ -z "$value" || "$value" =~ (CHANGE[-_]?ME|PLACEHOLDER|:PASSWORD@|\<|\>|my-project|example\.com|PROJECT:REGION) ]]; then
            missing+=("$name")
        fi
    done
}
require PROJECT_ID REGION CLOUDSQL_INSTANCE DATABASE_URL DB_MAX_CONNECTIONS
if [[ "${HTTP_ONLY:-}" != 1 ]]; then require DOMAIN; fi
if [[ -n "${ALARM_EMAIL:-}" ]]; then
    require ALARM_EMAIL
    [[ "$ALARM_EMAIL" =~ ^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$ ]] || missing+=(ALARM_EMAIL)
fi
for name in DB_MAX_CONNECTIONS DB_HEADROOM MAX_INSTANCES_CREATE_USER MAX_INSTANCES_UPLOAD_RECORD \
    MAX_INSTANCES_GET_RECORD DB_POOL_SIZE_CREATE_USER DB_POOL_SIZE_UPLOAD_RECORD \
    DB_POOL_SIZE_GET_RECORD RATE_LIMIT_RPS RATE_LIMIT_BURST; do
    if [[ -n "${!name:-}" && ! "${!name}" =~ ^[0-9]+$ ]]; then missing+=("$name"); fi
done
if ((${#missing[@]})); then
    echo "refusing to deploy: set ${missing[*]} (missing or still a placeholder); nothing was changed" >&2
    exit 2
fi

export PROJECT_ID REGION CLOUDSQL_INSTANCE
export BUCKET=${BUCKET:-$PROJECT_ID-records}
REPOSITORY=${REPOSITORY:-records}
IMAGE_TAG=${IMAGE_TAG:-$(git rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}
export DOWNLOAD_MODE=${DOWNLOAD_MODE:-redirect}
export MAX_UPLOAD_BYTES=${MAX_UPLOAD_BYTES:-31457280}
export MAX_DIRECT_UPLOAD_BYTES=${MAX_DIRECT_UPLOAD_BYTES:-4294967296}
if [[ "${HTTP_ONLY:-}" == 1 ]]; then
    export PUBLIC_BASE_URL=${PUBLIC_BASE_URL:-}
else
    export PUBLIC_BASE_URL=${PUBLIC_BASE_URL:-https://$DOMAIN}
fi
export MAX_INSTANCES_CREATE_USER=${MAX_INSTANCES_CREATE_USER:-2}
export MAX_INSTANCES_UPLOAD_RECORD=${MAX_INSTANCES_UPLOAD_RECORD:-3}
export MAX_INSTANCES_GET_RECORD=${MAX_INSTANCES_GET_RECORD:-3}
export DB_POOL_SIZE_CREATE_USER=${DB_POOL_SIZE_CREATE_USER:-4}
export DB_POOL_SIZE_UPLOAD_RECORD=${DB_POOL_SIZE_UPLOAD_RECORD:-2}
export DB_POOL_SIZE_GET_RECORD=${DB_POOL_SIZE_GET_RECORD:-4}
DB_HEADROOM=${DB_HEADROOM:-5}
RATE_LIMIT_RPS=${RATE_LIMIT_RPS:-100}
RATE_LIMIT_BURST=${RATE_LIMIT_BURST:-300}
SWEEP_SCHEDULE=${SWEEP_SCHEDULE:-"17 * * * *"}
FUNCTIONS=(create_user upload_record get_record)
G=(gcloud --project "$PROJECT_ID" --quiet)
DRY=${DRY_RUN:-}

# The connection budget: max instances x processes (WORKERS=1) x (pool + overflow 0) per
# service, plus one connection each for the sweep and migrate jobs (one task, DB_POOL_SIZE=1).
budget=$((MAX_INSTANCES_CREATE_USER * DB_POOL_SIZE_CREATE_USER
    + MAX_INSTANCES_UPLOAD_RECORD * DB_POOL_SIZE_UPLOAD_RECORD
    + MAX_INSTANCES_GET_RECORD * DB_POOL_SIZE_GET_RECORD + 1 + 1))
allowed=$((DB_MAX_CONNECTIONS - DB_HEADROOM))
echo "==> connection budget: $budget connections; allowed: $DB_MAX_CONNECTIONS - $DB_HEADROOM headroom = $allowed"
if ((budget > allowed)); then
    echo "refusing to deploy: connection budget $budget exceeds $allowed; lower MAX_INSTANCES_* or DB_POOL_SIZE_*, or use a larger Cloud SQL tier" >&2
    exit 2
fi

sa() { echo "records-$1@$PROJECT_ID.iam.gserviceaccount.com"; }
export SA_CREATE_USER SA_UPLOAD_RECORD SA_GET_RECORD
SA_CREATE_USER=$(sa create-user)
SA_UPLOAD_RECORD=$(sa upload-record)
SA_GET_RECORD=$(sa get-record)
SA_SWEEP=$(sa sweep)
SA_MIGRATE=$(sa migrate)
export TASKS_SERVICE_ACCOUNT
TASKS_SERVICE_ACCOUNT=$(sa tasks)
SA_SCHEDULER=$(sa scheduler)
REGISTRY="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY"
export CLOUD_TASKS_QUEUE="projects/$PROJECT_ID/locations/$REGION/queues/records-jobs"

render() {  # render 'VARS' < template: ${NAME} for the names in VARS, from the environment
    "${PYTHON:-.venv/bin/python}" -m devstack.templates "$1"
}
run() {
    if [[ "$DRY" == 1 ]]; then printf '+ %s\n' "$*"; else "$@"; fi
}
exists() {  # exists <gcloud describe command...>: true when the resource is there
    [[ "$DRY" != 1 ]] && "${G[@]}" "$@" >/dev/null 2>&1
}
put_secret() {  # put_secret NAME (value on stdin): create it or add a version
    local name=$1
    if [[ "$DRY" == 1 ]]; then
        cat >/dev/null
        printf '+ gcloud secrets versions add %s --data-file=- (value hidden)\n' "$name"
        return
    fi
    "${G[@]}" secrets describe "$name" >/dev/null 2>&1 \
        || "${G[@]}" secrets create "$name" --replication-policy=automatic
    "${G[@]}" secrets versions add "$name" --data-file=-
}
grant_secret() {  # grant_secret SECRET ACCOUNT...: only these accounts read this secret
    local name=$1 account
    shift
    for account in "$@"; do
        run "${G[@]}" secrets add-iam-policy-binding "$name" \
            --member="serviceAccount:$account" --role=roles/secretmanager.secretAccessor >/dev/null
    done
}
custom_role() {  # custom_role ID PERMISSIONS: a project role with exactly these permissions
    if exists iam roles describe "$1" --project "$PROJECT_ID"; then
        run "${G[@]}" iam roles update "$1" --project "$PROJECT_ID" --permissions="$2" >/dev/null
    else
        run "${G[@]}" iam roles create "$1" --project "$PROJECT_ID" --permissions="$2"
    fi
}

echo "==> 1/11 APIs, one service account per function and job, Artifact Registry"
run "${G[@]}" services enable run.googleapis.com artifactregistry.googleapis.com \
    sqladmin.googleapis.com secretmanager.googleapis.com compute.googleapis.com \
    storage.googleapis.com cloudtasks.googleapis.com cloudscheduler.googleapis.com \
    monitoring.googleapis.com
for name in create-user upload-record get-record sweep migrate tasks scheduler; do
    exists iam service-accounts describe "$(sa "$name")" \
        || run "${G[@]}" iam service-accounts create "records-$name" \
            --display-name="record service: $name"
done
for account in "$SA_CREATE_USER" "$SA_UPLOAD_RECORD" "$SA_GET_RECORD" "$SA_SWEEP" "$SA_MIGRATE"; do
    run "${G[@]}" projects add-iam-policy-binding "$PROJECT_ID" \
        --member="serviceAccount:$account" --role=roles/cloudsql.client --condition=None >/dev/null
done
exists artifacts repositories describe "$REPOSITORY" --location "$REGION" \
    || run "${G[@]}" artifacts repositories create "$REPOSITORY" --location "$REGION" \
        --repository-format=docker
run "${G[@]}" auth configure-docker "$REGION-docker.pkg.dev"

echo "==> 2/11 build and push the images"
for fn in "${FUNCTIONS[@]}"; do
    image="$REGISTRY/${fn//_/-}:$IMAGE_TAG"
    run docker buildx build --platform linux/amd64 --build-arg "FUNCTION=$fn" \
        --tag "$image" --push .
    export "IMAGE_${fn^^}=$image"
done

echo "==> 3/11 bucket gs://$BUCKET and each account's rights on it"
exists storage buckets describe "gs://$BUCKET" \
    || run "${G[@]}" storage buckets create "gs://$BUCKET" --location "$REGION" \
        --uniform-bucket-level-access --public-access-prevention
run "${G[@]}" storage buckets update "gs://$BUCKET" \
    --lifecycle-file=infra/gcp/bucket-lifecycle.json --cors-file=infra/gcp/bucket-cors.json
custom_role recordsEraser storage.objects.list,storage.objects.delete
custom_role recordsReader storage.objects.get
custom_role recordsSweeper storage.objects.list,storage.objects.delete,storage.multipartUploads.list,storage.multipartUploads.abort
bind_bucket() {
    run "${G[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" \
        --member="serviceAccount:$1" --role="$2" >/dev/null
}
bind_bucket "$SA_CREATE_USER" "projects/$PROJECT_ID/roles/recordsEraser"
bind_bucket "$SA_UPLOAD_RECORD" roles/storage.objectUser
bind_bucket "$SA_GET_RECORD" "projects/$PROJECT_ID/roles/recordsReader"
bind_bucket "$SA_SWEEP" "projects/$PROJECT_ID/roles/recordsSweeper"

echo "==> 4/11 secrets: DATABASE_URL, IDEMPOTENCY_SECRET, an HMAC key per account"
printf '%s' "$DATABASE_URL" | put_secret records-database-url
grant_secret records-database-url "$SA_CREATE_USER" "$SA_UPLOAD_RECORD" "$SA_GET_RECORD" \
    "$SA_SWEEP" "$SA_MIGRATE"
if [[ "$DRY" == 1 ]] || ! "${G[@]}" secrets describe records-idempotency-secret >/dev/null 2>&1; then
    # Made once: replacing it would invalidate stored idempotency keys and cursors.
    python3 -c 'import secrets; print(secrets.token_urlsafe(48), end="")' \
        | put_secret records-idempotency-secret
fi
grant_secret records-idempotency-secret "$SA_CREATE_USER" "$SA_UPLOAD_RECORD" "$SA_GET_RECORD"
for name in create-user upload-record get-record sweep; do
    account=$(sa "$name")
    if [[ "$DRY" == 1 ]] || ! "${G[@]}" secrets describe "records-hmac-$name-secret" >/dev/null 2>&1; then
        if [[ "$DRY" == 1 ]]; then
            echo "+ gcloud storage hmac create $account (access id and secret to Secret Manager)"
        else
            hmac=$("${G[@]}" storage hmac create "$account" \
                --format='value(metadata.accessId,secret)')
            printf '%s' "${hmac%%$'\t'*}" | put_secret "records-hmac-$name-id"
            printf '%s' "${hmac##*$'\t'}" | put_secret "records-hmac-$name-secret"
        fi
    fi
    grant_secret "records-hmac-$name-id" "$account"
    grant_secret "records-hmac-$name-secret" "$account"
done

echo "==> 5/11 Cloud Tasks queue records-jobs (3 attempts; the task's dispatch deadline is 1800 s)"
if exists tasks queues describe records-jobs --location "$REGION"; then
    run "${G[@]}" tasks queues update records-jobs --location "$REGION" --max-attempts=3 \
        --max-concurrent-dispatches="$MAX_INSTANCES_UPLOAD_RECORD"
else
    run "${G[@]}" tasks queues create records-jobs --location "$REGION" --max-attempts=3 \
        --max-concurrent-dispatches="$MAX_INSTANCES_UPLOAD_RECORD"
fi
run "${G[@]}" tasks queues add-iam-policy-binding records-jobs --location "$REGION" \
    --member="serviceAccount:$SA_UPLOAD_RECORD" --role=roles/cloudtasks.enqueuer >/dev/null
# upload-record creates tasks that carry an OIDC token of the tasks account: actAs on it only.
run "${G[@]}" iam service-accounts add-iam-policy-binding "$TASKS_SERVICE_ACCOUNT" \
    --member="serviceAccount:$SA_UPLOAD_RECORD" --role=roles/iam.serviceAccountUser >/dev/null
if [[ "$DRY" == 1 ]]; then
    PROJECT_NUMBER=000000000000
else
    PROJECT_NUMBER=$("${G[@]}" projects describe "$PROJECT_ID" --format='value(projectNumber)')
fi
export TASKS_TARGET_URL="https://records-upload-record-$PROJECT_NUMBER.$REGION.run.app/_tasks/convert"

echo "==> 6/11 migrations: the Cloud Run job records-migrate on the new image, before any service"
run "${G[@]}" run jobs deploy records-migrate --region "$REGION" --image "$IMAGE_UPLOAD_RECORD" \
    --service-account "$SA_MIGRATE" --set-cloudsql-instances "$CLOUDSQL_INSTANCE" \
    --set-secrets DATABASE_URL=records-database-url:latest \
    --set-env-vars FUNCTION_TARGET=migrate --max-retries 0 --task-timeout 900s
run "${G[@]}" run jobs execute records-migrate --region "$REGION" --wait

echo "==> 7/11 Cloud Run services (reached only through the load balancer)"
VARS='${PROJECT_ID} ${CLOUDSQL_INSTANCE} ${BUCKET} ${DOWNLOAD_MODE} ${MAX_UPLOAD_BYTES}
${MAX_DIRECT_UPLOAD_BYTES} ${PUBLIC_BASE_URL} ${IMAGE_CREATE_USER} ${IMAGE_UPLOAD_RECORD}
${IMAGE_GET_RECORD} ${SA_CREATE_USER} ${SA_UPLOAD_RECORD} ${SA_GET_RECORD}
${MAX_INSTANCES_CREATE_USER} ${MAX_INSTANCES_UPLOAD_RECORD} ${MAX_INSTANCES_GET_RECORD}
${DB_POOL_SIZE_CREATE_USER} ${DB_POOL_SIZE_UPLOAD_RECORD} ${DB_POOL_SIZE_GET_RECORD}
${CLOUD_TASKS_QUEUE} ${TASKS_TARGET_URL} ${TASKS_SERVICE_ACCOUNT}'
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for fn in "${FUNCTIONS[@]}"; do
    svc=${fn//_/-}
    render "$VARS" <"infra/gcp/$svc.yaml" >"$rendered/$svc.yaml"
    run "${G[@]}" run services replace "$rendered/$svc.yaml" --region "$REGION"
    # Ingress admits only the load balancer (and Cloud Tasks, internal); the functions
    # authenticate callers themselves.
    run "${G[@]}" run services add-iam-policy-binding "records-$svc" --region "$REGION" \
        --member=allUsers --role=roles/run.invoker
done
run "${G[@]}" run services add-iam-policy-binding records-upload-record --region "$REGION" \
    --member="serviceAccount:$TASKS_SERVICE_ACCOUNT" --role=roles/run.invoker

echo "==> 8/11 the sweep: Cloud Run job records-sweep, run by Cloud Scheduler ($SWEEP_SCHEDULE)"
run "${G[@]}" run jobs deploy records-sweep --region "$REGION" --image "$IMAGE_UPLOAD_RECORD" \
    --service-account "$SA_SWEEP" --set-cloudsql-instances "$CLOUDSQL_INSTANCE" \
    --set-env-vars "FUNCTION_TARGET=sweep,DB_POOL_SIZE=1,S3_ENDPOINT_URL=https://storage.googleapis.com,S3_REGION=auto,S3_BUCKET=$BUCKET" \
    --set-secrets DATABASE_URL=records-database-url:latest,AWS_ACCESS_KEY_ID=records-hmac-sweep-id:latest,AWS_SECRET_ACCESS_KEY=records-hmac-sweep-secret:latest \
    --max-retries 1 --task-timeout 1800s
run "${G[@]}" run jobs add-iam-policy-binding records-sweep --region "$REGION" \
    --member="serviceAccount:$SA_SCHEDULER" --role=roles/run.invoker
sweep_uri="https://run.googleapis.com/v2/projects/$PROJECT_ID/locations/$REGION/jobs/records-sweep:run"
verb=create
exists scheduler jobs describe records-sweep --location "$REGION" && verb=update
run "${G[@]}" scheduler jobs "$verb" http records-sweep --location "$REGION" \
    --schedule="$SWEEP_SCHEDULE" --uri="$sweep_uri" --http-method=POST \
    --oauth-service-account-email="$SA_SCHEDULER"

echo "==> 9/11 load balancer: NEGs, backend services with Cloud Armor, URL map, HTTPS"
# Cloud Armor: per client address, RATE_LIMIT_RPS/s with bursts of RATE_LIMIT_BURST (the
# router's limit), counted over 10 s windows: 10 x rps + burst; over it, 429.
exists compute security-policies describe records-armor \
    || run "${G[@]}" compute security-policies create records-armor \
        --description="record service: per-client rate limit"
rule=(--security-policy=records-armor --expression=true --action=throttle
    --rate-limit-threshold-count=$((10 * RATE_LIMIT_RPS + RATE_LIMIT_BURST))
    --rate-limit-threshold-interval-sec=10 --conform-action=allow --exceed-action=deny-429
    --enforce-on-key=IP)
if exists compute security-policies rules describe 1000 --security-policy=records-armor; then
    run "${G[@]}" compute security-policies rules update 1000 "${rule[@]}"
else
    run "${G[@]}" compute security-policies rules create 1000 "${rule[@]}"
fi
for fn in "${FUNCTIONS[@]}"; do
    svc=${fn//_/-}
    exists compute network-endpoint-groups describe "records-$svc" --region "$REGION" \
        || run "${G[@]}" compute network-endpoint-groups create "records-$svc" \
            --region "$REGION" --network-endpoint-type=serverless \
            --cloud-run-service="records-$svc"
    if ! exists compute backend-services describe "records-$svc" --global; then
        run "${G[@]}" compute backend-services create "records-$svc" --global \
            --load-balancing-scheme=EXTERNAL_MANAGED
        run "${G[@]}" compute backend-services add-backend "records-$svc" --global \
            --network-endpoint-group="records-$svc" \
            --network-endpoint-group-region="$REGION"
    fi
    run "${G[@]}" compute backend-services update "records-$svc" --global \
        --security-policy=records-armor
done
render '${PROJECT_ID}' <infra/gcp/url-map.yaml >"$rendered/url-map.yaml"
run "${G[@]}" compute url-maps import records-url-map --global --source "$rendered/url-map.yaml"
exists compute addresses describe records-ip --global \
    || run "${G[@]}" compute addresses create records-ip --global
if [[ "${HTTP_ONLY:-}" == 1 ]]; then
    echo "    HTTP_ONLY=1: plain HTTP on port 80, no certificate"
    exists compute target-http-proxies describe records-http-proxy \
        || run "${G[@]}" compute target-http-proxies create records-http-proxy \
            --url-map=records-url-map
else
    exists compute ssl-certificates describe records-cert --global \
        || run "${G[@]}" compute ssl-certificates create records-cert --global \
            --domains="$DOMAIN"
    exists compute target-https-proxies describe records-https-proxy \
        || run "${G[@]}" compute target-https-proxies create records-https-proxy \
            --url-map=records-url-map --ssl-certificates=records-cert
    exists compute forwarding-rules describe records-https --global \
        || run "${G[@]}" compute forwarding-rules create records-https --global \
            --load-balancing-scheme=EXTERNAL_MANAGED --address=records-ip \
            --target-https-proxy=records-https-proxy --ports=443
    # Port 80 only redirects to HTTPS.
    run "${G[@]}" compute url-maps import records-http-redirect --global \
        --source infra/gcp/http-redirect.yaml
    exists compute target-http-proxies describe records-http-proxy \
        || run "${G[@]}" compute target-http-proxies create records-http-proxy \
            --url-map=records-http-redirect
fi
exists compute forwarding-rules describe records-http --global \
    || run "${G[@]}" compute forwarding-rules create records-http --global \
        --load-balancing-scheme=EXTERNAL_MANAGED --address=records-ip \
        --target-http-proxy=records-http-proxy --ports=80

echo "==> 10/11 alert policies (infra/gcp/alerts/*.yaml), notifying ${ALARM_EMAIL:-nobody (ALARM_EMAIL unset)}"
channel=""
if [[ -n "${ALARM_EMAIL:-}" ]]; then
    if [[ "$DRY" != 1 ]]; then
        channel=$("${G[@]}" beta monitoring channels list --format='value(name)' \
            --filter="type=email AND labels.email_address=\"$ALARM_EMAIL\"" | head -n 1)
    fi
    if [[ -z "$channel" && "$DRY" == 1 ]]; then
        printf '+ %s beta monitoring channels create --type=email --channel-labels=%s\n' \
            "${G[*]}" "email_address=$ALARM_EMAIL"
        channel="projects/$PROJECT_ID/notificationChannels/DRY_RUN"
    elif [[ -z "$channel" ]]; then
        channel=$("${G[@]}" beta monitoring channels create --type=email \
            --display-name="records alarms" --channel-labels="email_address=$ALARM_EMAIL" \
            --format='value(name)')
    fi
fi
# A policy is found again by its displayName (the first line of its file that starts with
# one): replaced from the file on a re-run, keeping the channels it already notifies.
for policy in infra/gcp/alerts/*.yaml; do
    name=$(sed -n 's/^displayName: *//p' "$policy" | head -n 1)
    id=""
    if [[ "$DRY" != 1 ]]; then
        id=$("${G[@]}" monitoring policies list --format='value(name)' \
            --filter="displayName=\"$name\"" | head -n 1)
    fi
    if [[ -z "$id" ]]; then
        run "${G[@]}" monitoring policies create --policy-from-file="$policy" \
            ${channel:+--notification-channels="$channel"}
        continue
    fi
    channels=$("${G[@]}" monitoring policies describe "$id" \
        --format='value(notificationChannels.list(separator=","))')
    if [[ -n "$channel" && ",$channels," != *",$channel,"* ]]; then
        channels=${channels:+$channels,}$channel
    fi
    run "${G[@]}" monitoring policies update "$id" --policy-from-file="$policy" \
        ${channels:+--set-notification-channels="$channels"}
done

echo "==> 11/11 done"
if [[ "$DRY" != 1 ]]; then
    ip=$("${G[@]}" compute addresses describe records-ip --global --format='value(address)')
    if [[ "${HTTP_ONLY:-}" == 1 ]]; then
        echo "The service answers on http://$ip (allow a few minutes for the load balancer)."
    else
        echo "Point $DOMAIN at $ip; the managed certificate is issued once DNS resolves, then"
        echo "the service answers on https://$DOMAIN (http:// redirects)."
    fi
fi
