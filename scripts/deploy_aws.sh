#!/usr/bin/env bash
# make deploy-aws: build the three function images, push them to ECR, deploy
# infra/aws/template.yaml with CloudFormation, apply the database migrations, print the URL.
#
# Needs: docker (with buildx), the AWS CLI v2 signed in (aws sts get-caller-identity works),
# and uv/make install done. Settings (environment):
#   AWS_REGION       region to deploy to (required)
#   DATABASE_URL     postgresql://user:password@host:5432/db the functions will use (required);
#                    this machine must reach it too, to migrate (see README)
#   STACK_NAME       CloudFormation stack and name prefix (default: records)
#   ECR_REPOSITORY   ECR repository for the images (default: $STACK_NAME)
#   IMAGE_TAG        tag for this release (default: git short hash)
#   BUCKET_NAME      bucket name (default: chosen by CloudFormation)
#   SUBNET_IDS, SECURITY_GROUP_IDS   comma-separated, to run the functions in a VPC
#   DRY_RUN=1        print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

: "${AWS_REGION:?set AWS_REGION, e.g. eu-west-1}"
: "${DATABASE_URL:?set DATABASE_URL to the postgresql:// URL the functions will use}"
STACK_NAME=${STACK_NAME:-records}
ECR_REPOSITORY=${ECR_REPOSITORY:-$STACK_NAME}
IMAGE_TAG=${IMAGE_TAG:-$(git rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}
FUNCTIONS=(create_user upload_record get_record)

run() {
    if [[ "${DRY_RUN:-}" == 1 ]]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

if [[ "${DRY_RUN:-}" == 1 ]]; then
    ACCOUNT_ID=123456789012
else
    ACCOUNT_ID=$(aws sts get-caller-identity --query Account --output text)
fi
REGISTRY="$ACCOUNT_ID.dkr.ecr.$AWS_REGION.amazonaws.com"
REPO_URI="$REGISTRY/$ECR_REPOSITORY"

echo "==> 1/5 ECR repository $REPO_URI"
if [[ "${DRY_RUN:-}" == 1 ]] \
    || ! aws ecr describe-repositories --region "$AWS_REGION" \
        --repository-names "$ECR_REPOSITORY" >/dev/null 2>&1; then
    run aws ecr create-repository --region "$AWS_REGION" --repository-name "$ECR_REPOSITORY" \
        --image-scanning-configuration scanOnPush=true
fi
if [[ "${DRY_RUN:-}" == 1 ]]; then
    printf '+ aws ecr get-login-password | docker login --username AWS --password-stdin %s\n' \
        "$REGISTRY"
else
    aws ecr get-login-password --region "$AWS_REGION" \
        | docker login --username AWS --password-stdin "$REGISTRY"
fi

echo "==> 2/5 build and push the images (linux/amd64; Lambda wants Docker v2 manifests)"
declare -A IMAGES
for fn in "${FUNCTIONS[@]}"; do
    image="$REPO_URI:${fn//_/-}-$IMAGE_TAG"
    run docker buildx build --platform linux/amd64 --provenance=false --sbom=false \
        --build-arg "FUNCTION=$fn" --tag "$image" --push .
    IMAGES[$fn]=$image
done

echo "==> 3/5 deploy the CloudFormation stack $STACK_NAME"
params=(
    "CreateUserImageUri=${IMAGES[create_user]}"
    "UploadRecordImageUri=${IMAGES[upload_record]}"
    "GetRecordImageUri=${IMAGES[get_record]}"
    "DatabaseUrl=$DATABASE_URL"
)
[[ -n "${BUCKET_NAME:-}" ]] && params+=("BucketName=$BUCKET_NAME")
[[ -n "${SUBNET_IDS:-}" ]] && params+=("SubnetIds=$SUBNET_IDS")
[[ -n "${SECURITY_GROUP_IDS:-}" ]] && params+=("SecurityGroupIds=$SECURITY_GROUP_IDS")
if [[ "${DRY_RUN:-}" == 1 ]]; then  # never print the database password
    printf '+ aws cloudformation deploy --template-file infra/aws/template.yaml --stack-name %s %s\n' \
        "$STACK_NAME" "--capabilities CAPABILITY_IAM --parameter-overrides (DatabaseUrl hidden)"
else
    aws cloudformation deploy --region "$AWS_REGION" --stack-name "$STACK_NAME" \
        --template-file infra/aws/template.yaml --capabilities CAPABILITY_IAM \
        --no-fail-on-empty-changeset --parameter-overrides "${params[@]}"
fi

echo "==> 4/5 database migrations (alembic upgrade head)"
if [[ "${DRY_RUN:-}" == 1 ]]; then
    echo "+ uv run --frozen alembic upgrade head   (DATABASE_URL from the environment)"
else
    uv run --frozen alembic upgrade head
fi

echo "==> 5/5 done"
if [[ "${DRY_RUN:-}" != 1 ]]; then
    aws cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
        --query "Stacks[0].Outputs[].[OutputKey,OutputValue]" --output table
fi
