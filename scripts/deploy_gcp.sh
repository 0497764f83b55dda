#!/usr/bin/env bash
# make deploy-gcp: build the three function images, push them to Artifact Registry, create the
# bucket (lifecycle + CORS) and its HMAC key, store the secrets, deploy the Cloud Run services
# (infra/gcp/*.yaml), migrate with a Cloud Run job, and route the paths under one host with an
# external Application Load Balancer (infra/gcp/url-map.yaml). Safe to run again.
#
# Needs: docker (with buildx), gcloud signed in with a project you own, and a Cloud SQL for
# PostgreSQL instance with a database and user. Settings (environment):
#   PROJECT_ID          Google Cloud project (required)
#   REGION              region of Cloud Run, Artifact Registry and the bucket (required)
#   CLOUDSQL_INSTANCE   PROJECT:REGION:INSTANCE connection name (required)
#   DATABASE_URL        e.g. postgresql://records:PASSWORD@/records?host=/cloudsql/PROJECT:REGION:INSTANCE
#                       (required; the socket Cloud Run mounts for CLOUDSQL_INSTANCE)
#   BUCKET              bucket name (default: $PROJECT_ID-records)
#   REPOSITORY          Artifact Registry repository (default: records)
#   IMAGE_TAG           tag for this release (default: git short hash)
#   DOWNLOAD_MODE       redirect (default; Cloud Run caps HTTP/1 responses at 32 MiB) or stream
#   MAX_UPLOAD_BYTES    POST /records body limit (default 31457280: under Cloud Run's 32 MiB)
#   MAX_DIRECT_UPLOAD_BYTES  direct upload limit (default 4294967296)
#   PUBLIC_BASE_URL     https://your.domain once DNS points at the load balancer (optional)
#   DRY_RUN=1           print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PROJECT_ID:?set PROJECT_ID}"
: "${REGION:?set REGION, e.g. europe-west1}"
: "${CLOUDSQL_INSTANCE:?set CLOUDSQL_INSTANCE to PROJECT:REGION:INSTANCE}"
: "${DATABASE_URL:?set DATABASE_URL (see the header of this script)}"
export PROJECT_ID REGION CLOUDSQL_INSTANCE
export BUCKET=${BUCKET:-$PROJECT_ID-records}
REPOSITORY=${REPOSITORY:-records}
IMAGE_TAG=${IMAGE_TAG:-$(git rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}
export DOWNLOAD_MODE=${DOWNLOAD_MODE:-redirect}
export MAX_UPLOAD_BYTES=${MAX_UPLOAD_BYTES:-31457280}
export MAX_DIRECT_UPLOAD_BYTES=${MAX_DIRECT_UPLOAD_BYTES:-4294967296}
export PUBLIC_BASE_URL=${PUBLIC_BASE_URL:-}
SA_NAME=records-runtime
export SERVICE_ACCOUNT="$SA_NAME@$PROJECT_ID.iam.gserviceaccount.com"
REGISTRY="$REGION-docker.pkg.dev/$PROJECT_ID/$REPOSITORY"
FUNCTIONS=(create_user upload_record get_record)
G=(gcloud --project "$PROJECT_ID" --quiet)
DRY=${DRY_RUN:-}

render() {  # render 'VARS' < template: ${NAME} for the names in VARS, from the environment
    python3 scripts/render_template.py "$1"
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

echo "==> 1/8 APIs, service account, Artifact Registry"
run "${G[@]}" services enable run.googleapis.com artifactregistry.googleapis.com \
    sqladmin.googleapis.com secretmanager.googleapis.com compute.googleapis.com \
    storage.googleapis.com
exists iam service-accounts describe "$SERVICE_ACCOUNT" \
    || run "${G[@]}" iam service-accounts create "$SA_NAME" --display-name="record service"
for role in roles/cloudsql.client roles/secretmanager.secretAccessor; do
    run "${G[@]}" projects add-iam-policy-binding "$PROJECT_ID" \
        --member="serviceAccount:$SERVICE_ACCOUNT" --role="$role" --condition=None >/dev/null
done
exists artifacts repositories describe "$REPOSITORY" --location "$REGION" \
    || run "${G[@]}" artifacts repositories create "$REPOSITORY" --location "$REGION" \
        --repository-format=docker
run "${G[@]}" auth configure-docker "$REGION-docker.pkg.dev"

echo "==> 2/8 build and push the images"
for fn in "${FUNCTIONS[@]}"; do
    image="$REGISTRY/${fn//_/-}:$IMAGE_TAG"
    run docker buildx build --platform linux/amd64 --build-arg "FUNCTION=$fn" \
        --tag "$image" --push .
    export "IMAGE_${fn^^}=$image"
done

echo "==> 3/8 bucket gs://$BUCKET (lifecycle: abandoned direct uploads expire after 1 day)"
exists storage buckets describe "gs://$BUCKET" \
    || run "${G[@]}" storage buckets create "gs://$BUCKET" --location "$REGION" \
        --uniform-bucket-level-access --public-access-prevention
run "${G[@]}" storage buckets update "gs://$BUCKET" \
    --lifecycle-file=infra/gcp/bucket-lifecycle.json --cors-file=infra/gcp/bucket-cors.json
run "${G[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" \
    --member="serviceAccount:$SERVICE_ACCOUNT" --role=roles/storage.objectAdmin >/dev/null

echo "==> 4/8 secrets: DATABASE_URL and an HMAC key for the XML (S3-compatible) API"
printf '%s' "$DATABASE_URL" | put_secret records-database-url
if [[ "$DRY" == 1 ]] || ! "${G[@]}" secrets describe records-hmac-secret >/dev/null 2>&1; then
    if [[ "$DRY" == 1 ]]; then
        echo "+ gcloud storage hmac create $SERVICE_ACCOUNT (access id and secret to Secret Manager)"
    else
        hmac=$("${G[@]}" storage hmac create "$SERVICE_ACCOUNT" \
            --format='value(metadata.accessId,secret)')
        printf '%s' "${hmac%%$'\t'*}" | put_secret records-hmac-access-id
        printf '%s' "${hmac##*$'\t'}" | put_secret records-hmac-secret
    fi
fi

echo "==> 5/8 Cloud Run services"
VARS='${PROJECT_ID} ${CLOUDSQL_INSTANCE} ${SERVICE_ACCOUNT} ${BUCKET} ${DOWNLOAD_MODE}
${MAX_UPLOAD_BYTES} ${MAX_DIRECT_UPLOAD_BYTES} ${PUBLIC_BASE_URL} ${IMAGE_CREATE_USER}
${IMAGE_UPLOAD_RECORD} ${IMAGE_GET_RECORD}'
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for fn in "${FUNCTIONS[@]}"; do
    svc=${fn//_/-}
    render "$VARS" <"infra/gcp/$svc.yaml" >"$rendered/$svc.yaml"
    run "${G[@]}" run services replace "$rendered/$svc.yaml" --region "$REGION"
    # The load balancer is the only way in (ingress); the functions authenticate callers.
    run "${G[@]}" run services add-iam-policy-binding "records-$svc" --region "$REGION" \
        --member=allUsers --role=roles/run.invoker
done

echo "==> 6/8 migrations (a Cloud Run job on the upload_record image)"
run "${G[@]}" run jobs deploy records-migrate --region "$REGION" --image "$IMAGE_UPLOAD_RECORD" \
    --service-account "$SERVICE_ACCOUNT" --set-cloudsql-instances "$CLOUDSQL_INSTANCE" \
    --set-secrets DATABASE_URL=records-database-url:latest \
    --command python --args=-m,alembic,-c,/app/alembic.ini,upgrade,head
run "${G[@]}" run jobs execute records-migrate --region "$REGION" --wait

echo "==> 7/8 load balancer: serverless NEGs, backend services, URL map"
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
done
render '${PROJECT_ID}' <infra/gcp/url-map.yaml >"$rendered/url-map.yaml"
run "${G[@]}" compute url-maps import records-url-map --global --source "$rendered/url-map.yaml"
exists compute addresses describe records-ip --global \
    || run "${G[@]}" compute addresses create records-ip --global
exists compute target-http-proxies describe records-http-proxy \
    || run "${G[@]}" compute target-http-proxies create records-http-proxy \
        --url-map=records-url-map
exists compute forwarding-rules describe records-http --global \
    || run "${G[@]}" compute forwarding-rules create records-http --global \
        --load-balancing-scheme=EXTERNAL_MANAGED --address=records-ip \
        --target-http-proxy=records-http-proxy --ports=80

echo "==> 8/8 done"
if [[ "$DRY" != 1 ]]; then
    ip=$("${G[@]}" compute addresses describe records-ip --global --format='value(address)')
    echo "The service answers on http://$ip (allow a few minutes for the load balancer)."
    echo "For HTTPS, see README 'Deploy to Cloud Run', step 6."
fi
