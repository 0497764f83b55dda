#!/usr/bin/env bash
# make deploy-aws: build the images, push them to ECR, and roll out in the safe order:
# (1) the edge stack (infra/aws/edge.yaml: the CloudFront WAF web ACL with the per-client rate
# limit) in us-east-1, the only region where CloudFront web ACLs exist; its ARN goes to the
# service stack, which needs it before its CloudFront distribution can exist; (2) the service
# stack (infra/aws/template.yaml) with the new image on the migrate and sweep functions only,
# (3) the migrations (the migrate function, invoked and checked), (4) the service stack with
# the new images on the serving functions. docs/deploy-aws.md explains each step.
#
# Needs: docker (with buildx), the AWS CLI v2 signed in, and uv/make install done.
# Required (the script refuses to start, naming the value, while one is missing or still a
# placeholder):
#   AWS_REGION            region to deploy to
#   DATABASE_HOST         PostgreSQL host (e.g. the RDS endpoint); no credentials
#   DATABASE_SECRET_ARN   Secrets Manager secret with {"username": ..., "password": ...}
#   DB_MAX_CONNECTIONS    the database's max_connections (SHOW max_connections)
# Optional:
#   DATABASE_NAME (records), DATABASE_PORT (5432), DB_TLS (require), DB_HEADROOM (10: kept for
#   admin sessions and migrations), STACK_NAME (records), ECR_REPOSITORY ($STACK_NAME),
#   IMAGE_TAG (git short hash), BUCKET_NAME, SUBNET_IDS, SECURITY_GROUP_IDS,
#   USE_RDS_PROXY=true + DATABASE_INSTANCE_ID, ALARM_EMAIL,
#   CREATE_USER_CONCURRENCY (5), UPLOAD_RECORD_CONCURRENCY (10), GET_RECORD_CONCURRENCY (20),
#   RATE_LIMIT_RPS (100), RATE_LIMIT_BURST (300): the router's per-client defaults, applied by
#   the WAF rule as RATE_LIMIT_RPS x 60 + RATE_LIMIT_BURST requests per 60 s per address, and
#   by the API stage as its throttle for all clients together; EDGE_STACK_NAME ($STACK_NAME-edge)
#   DRY_RUN=1             print the steps instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
require() {  # require NAME...: set, and not a placeholder from the docs
    local name value
    for name in "$@"; do
        value=${!name:-}
        if [[ -z "$value" || "$value" =~ (CHANGE[-_]?ME|PLACEHOLDER|PASSWORD|xxxx|\<|\>|example\.com|123456789012:secret:records-db-EXAMPLE) ]]; then
            missing+=("$name")
        fi
    done
}
require AWS_REGION DATABASE_HOST DATABASE_SECRET_ARN DB_MAX_CONNECTIONS
if [[ -n "${DATABASE_HOST:-}" && "$DATABASE_HOST" == *@* ]]; then
    echo "refusing to deploy: DATABASE_HOST holds credentials; they belong in DATABASE_SECRET_ARN" >&2
    exit 2
fi
if [[ "${USE_RDS_PROXY:-false}" == true ]]; then
    require DATABASE_INSTANCE_ID SUBNET_IDS SECURITY_GROUP_IDS
fi
for name in DB_MAX_CONNECTIONS DB_HEADROOM CREATE_USER_CONCURRENCY UPLOAD_RECORD_CONCURRENCY \
    GET_RECORD_CONCURRENCY; do
    if [[ -n "${!name:-}" && ! "${!name}" =~ ^[0-9]+$ ]]; then missing+=("$name"); fi
done
for name in RATE_LIMIT_RPS RATE_LIMIT_BURST; do  # at least 1 (the stage throttle's minimum)
    if [[ -n "${!name:-}" && ! "${!name}" =~ ^[1-9][0-9]*$ ]]; then missing+=("$name"); fi
done
if ((${#missing[@]})); then
    echo "refusing to deploy: set ${missing[*]} (missing or still a placeholder); nothing was changed" >&2
    exit 2
fi

STACK_NAME=${STACK_NAME:-records}
ECR_REPOSITORY=${ECR_REPOSITORY:-$STACK_NAME}
IMAGE_TAG=${IMAGE_TAG:-$(git rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}
CREATE_USER_CONCURRENCY=${CREATE_USER_CONCURRENCY:-5}
UPLOAD_RECORD_CONCURRENCY=${UPLOAD_RECORD_CONCURRENCY:-10}
GET_RECORD_CONCURRENCY=${GET_RECORD_CONCURRENCY:-20}
DB_HEADROOM=${DB_HEADROOM:-10}
RATE_LIMIT_RPS=${RATE_LIMIT_RPS:-100}
RATE_LIMIT_BURST=${RATE_LIMIT_BURST:-300}
# CloudFront web ACLs (WAF scope CLOUDFRONT) can only be created in us-east-1.
EDGE_REGION=us-east-1
EDGE_STACK_NAME=${EDGE_STACK_NAME:-$STACK_NAME-edge}
# nginx's limit_req admits at most rate x T + burst requests in any T seconds: the WAF's
# 60 s window gets the same bound (100 x 60 + 300 = 6300 by default).
WAF_LIMIT_PER_MINUTE=$((RATE_LIMIT_RPS * 60 + RATE_LIMIT_BURST))
FUNCTIONS=(create_user upload_record get_record)

# The connection budget: every Lambda execution environment is one process holding at most
# pool + overflow connections (the template's Pool mapping: 1 + 1); sweep and migrate have a
# reserved concurrency of 1 each.
POOL_PER_PROCESS=2
environments=$((CREATE_USER_CONCURRENCY + UPLOAD_RECORD_CONCURRENCY + GET_RECORD_CONCURRENCY + 1 + 1))
budget=$((environments * POOL_PER_PROCESS))
allowed=$((DB_MAX_CONNECTIONS - DB_HEADROOM))
echo "==> connection budget: $environments environments x 1 process x $POOL_PER_PROCESS connections = $budget; allowed: $DB_MAX_CONNECTIONS - $DB_HEADROOM headroom = $allowed"
if [[ "${USE_RDS_PROXY:-false}" == true ]]; then
    echo "    (RDS Proxy: the proxy opens at most ProxyMaxConnectionsPercent of max_connections)"
elif ((budget > allowed)); then
    echo "refusing to deploy: connection budget $budget exceeds $allowed; lower the *_CONCURRENCY values, raise max_connections, or set USE_RDS_PROXY=true" >&2
    exit 2
fi

run() {
    if [[ "${DRY_RUN:-}" == 1 ]]; then printf '+ %s\n' "$*"; else "$@"; fi
}

if [[ "${DRY_RUN:-}" == 1 ]]; then
    ACCOUNT_ID=123456789012
else
    ACCOUNT_ID=$(aws sts get-caller-identity --query Account --output text)
fi
REGISTRY="$ACCOUNT_ID.dkr.ecr.$AWS_REGION.amazonaws.com"
REPO_URI="$REGISTRY/$ECR_REPOSITORY"

echo "==> 1/7 ECR repository $REPO_URI"
if [[ "${DRY_RUN:-}" == 1 ]] \
    || ! aws ecr describe-repositories --region "$AWS_REGION" \
        --repository-names "$ECR_REPOSITORY" >/dev/null 2>&1; then
    run aws ecr create-repository --region "$AWS_REGION" --repository-name "$ECR_REPOSITORY" \
        --image-scanning-configuration scanOnPush=true --image-tag-mutability IMMUTABLE
fi
if [[ "${DRY_RUN:-}" == 1 ]]; then
    printf '+ aws ecr get-login-password | docker login --username AWS --password-stdin %s\n' \
        "$REGISTRY"
else
    aws ecr get-login-password --region "$AWS_REGION" \
        | docker login --username AWS --password-stdin "$REGISTRY"
fi

echo "==> 2/7 build and push the images (linux/amd64; Lambda wants Docker v2 manifests)"
declare -A IMAGES
for fn in "${FUNCTIONS[@]}"; do
    image="$REPO_URI:${fn//_/-}-$IMAGE_TAG"
    run docker buildx build --platform linux/amd64 --provenance=false --sbom=false \
        --build-arg "FUNCTION=$fn" --tag "$image" --push .
    IMAGES[$fn]=$image
done

echo "==> 3/7 edge stack $EDGE_STACK_NAME in $EDGE_REGION: WAF web ACL, $WAF_LIMIT_PER_MINUTE requests per 60 s per client address"
run aws cloudformation deploy --region "$EDGE_REGION" --stack-name "$EDGE_STACK_NAME" \
    --template-file infra/aws/edge.yaml --no-fail-on-empty-changeset \
    --parameter-overrides "RateLimitPerMinute=$WAF_LIMIT_PER_MINUTE"
if [[ "${DRY_RUN:-}" == 1 ]]; then
    echo "+ aws cloudformation describe-stacks --region $EDGE_REGION --stack-name $EDGE_STACK_NAME (output WebAclArn)"
    WEB_ACL_ARN="arn:aws:wafv2:us-east-1:$ACCOUNT_ID:global/webacl/$EDGE_STACK_NAME-acl/dry-run"
else
    WEB_ACL_ARN=$(aws cloudformation describe-stacks --region "$EDGE_REGION" \
        --stack-name "$EDGE_STACK_NAME" \
        --query "Stacks[0].Outputs[?OutputKey=='WebAclArn'].OutputValue" --output text)
fi
if [[ ! "$WEB_ACL_ARN" =~ ^arn:aws[a-z-]*:wafv2:us-east-1:[0-9]{12}:global/webacl/.+$ ]]; then
    echo "the edge stack $EDGE_STACK_NAME has no WebAclArn output ('$WEB_ACL_ARN'); the service stack was not changed" >&2
    exit 1
fi

common_params=(
    "EdgeWebAclArn=$WEB_ACL_ARN"
    "RateLimitRps=$RATE_LIMIT_RPS"
    "RateLimitBurst=$RATE_LIMIT_BURST"
    "MigrateImageUri=${IMAGES[upload_record]}"
    "DatabaseHost=$DATABASE_HOST"
    "DatabasePort=${DATABASE_PORT:-5432}"
    "DatabaseName=${DATABASE_NAME:-records}"
    "DatabaseSecretArn=$DATABASE_SECRET_ARN"
    "DatabaseTls=${DB_TLS:-require}"
    "UseRdsProxy=${USE_RDS_PROXY:-false}"
    "CreateUserConcurrency=$CREATE_USER_CONCURRENCY"
    "UploadRecordConcurrency=$UPLOAD_RECORD_CONCURRENCY"
    "GetRecordConcurrency=$GET_RECORD_CONCURRENCY"
)
[[ -n "${DATABASE_INSTANCE_ID:-}" ]] && common_params+=("DatabaseInstanceId=$DATABASE_INSTANCE_ID")
[[ -n "${BUCKET_NAME:-}" ]] && common_params+=("BucketName=$BUCKET_NAME")
[[ -n "${SUBNET_IDS:-}" ]] && common_params+=("SubnetIds=$SUBNET_IDS")
[[ -n "${SECURITY_GROUP_IDS:-}" ]] && common_params+=("SecurityGroupIds=$SECURITY_GROUP_IDS")
[[ -n "${ALARM_EMAIL:-}" ]] && common_params+=("AlarmEmail=$ALARM_EMAIL")

deploy() {  # deploy PARAM=VALUE...: one CloudFormation update (unnamed parameters keep theirs)
    run aws cloudformation deploy --region "$AWS_REGION" --stack-name "$STACK_NAME" \
        --template-file infra/aws/template.yaml --capabilities CAPABILITY_IAM \
        --no-fail-on-empty-changeset --parameter-overrides "$@"
}

stack_exists=0
if [[ "${DRY_RUN:-}" != 1 ]] && aws cloudformation describe-stacks --region "$AWS_REGION" \
    --stack-name "$STACK_NAME" >/dev/null 2>&1; then
    stack_exists=1
fi

echo "==> 4/7 stack $STACK_NAME: the new image on the migrate and sweep functions only"
if ((stack_exists)) || [[ "${DRY_RUN:-}" == 1 && -z "${DRY_RUN_FIRST_DEPLOY:-}" ]]; then
    # The image parameters of the serving functions are left out: `cloudformation deploy`
    # keeps a parameter's previous value when it is not given.
    deploy "${common_params[@]}"
else
    # First deploy: nothing serves yet, so the functions start on the new images; the API
    # answers 503 until step 5 has created the tables.
    deploy "${common_params[@]}" "CreateUserImageUri=${IMAGES[create_user]}" \
        "UploadRecordImageUri=${IMAGES[upload_record]}" "GetRecordImageUri=${IMAGES[get_record]}"
fi

echo "==> 5/7 migrations: invoke $STACK_NAME-migrate (alembic upgrade head) and check it"
if [[ "${DRY_RUN:-}" == 1 ]]; then
    echo "+ aws lambda invoke --function-name $STACK_NAME-migrate --payload {} (stop on FunctionError)"
else
    out=$(mktemp)
    error=$(aws lambda invoke --region "$AWS_REGION" --function-name "$STACK_NAME-migrate" \
        --cli-binary-format raw-in-base64-out --payload '{}' --query FunctionError \
        --output text "$out")
    if [[ "$error" != None && -n "$error" ]]; then
        echo "migrations failed ($error): $(cat "$out"); the serving functions were not changed" >&2
        exit 1
    fi
fi

echo "==> 6/7 stack $STACK_NAME: the new images on the serving functions"
deploy "${common_params[@]}" "CreateUserImageUri=${IMAGES[create_user]}" \
    "UploadRecordImageUri=${IMAGES[upload_record]}" "GetRecordImageUri=${IMAGES[get_record]}"

echo "==> 7/7 done"
if [[ "${DRY_RUN:-}" != 1 ]]; then
    aws cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
        --query "Stacks[0].Outputs[].[OutputKey,OutputValue]" --output table
fi
