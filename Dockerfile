# One image per function: docker build --build-arg FUNCTION=upload_record -t records/upload_record .
#
# Build arguments
#   FUNCTION      create_user | upload_record | get_record (sets FUNCTION_TARGET)
#   PYTHON_IMAGE  the Python base image (an offline builder passes a local stand-in)
#
# Layout of the result (every stage below starts FROM ${PYTHON_IMAGE}):
#   /            the base image, flattened without docs, man pages, locales and pip (runtime
#                needs none of them; flattening is what lets the deletions shrink the image)
#   /opt/venv    the locked dependencies (uv.lock, exported with `uv export --frozen`) + common,
#                with botocore's models of the services used only (BOTOCORE_SERVICES below)
#   /app         alembic.ini, migrations/ and functions/${FUNCTION}/main.py
#   ffmpeg       upload_record only: a static ffmpeg built from Debian's source with just what
#                the conversion uses (WAV demuxer, PCM decoders, libmp3lame, MP3 muxer, pipe
#                protocol in, file protocol out): about 2.5 MB, where Debian's ffmpeg package pulls in hundreds of MB
# The container runs as uid 10001, writes nothing outside /tmp (read-only root friendly),
# serves on $PORT (default 8080) and has a HEALTHCHECK on /healthz.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG FUNCTION=create_user

# ---------------------------------------------------------------- base: the trimmed base image
FROM ${PYTHON_IMAGE} AS trimmed
RUN set -eux; \
    useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app; \
    rm -rf /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/lintian \
        /usr/share/python-wheels /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old \
        /var/log/* /root/.cache; \
    for site in /usr/lib/python3/dist-packages /usr/local/lib/python3*/site-packages; do \
        rm -rf "$site"/pip "$site"/pip-* "$site"/setuptools "$site"/setuptools-* \
            "$site"/pkg_resources "$site"/_distutils_hack "$site"/wheel "$site"/wheel-* \
            "$site"/distutils-precedence.pth; \
    done; \
    rm -rf /usr/local/lib/python3*/ensurepip/_bundled /usr/lib/python3*/ensurepip/_bundled; \
    rm -f /usr/local/bin/pip /usr/local/bin/pip3* /usr/bin/pip /usr/bin/pip3*

FROM scratch AS base
COPY --from=trimmed / /
ENV LANG=C.UTF-8 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- deps: the locked virtualenv
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m pip install --no-cache-dir "uv==0.13.9" \
    || python3 -m pip install --no-cache-dir --break-system-packages "uv==0.13.9"
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY common/pyproject.toml common/pyproject.toml
RUN uv export --frozen --no-dev --no-emit-workspace --format requirements-txt -o /requirements.txt
RUN python3 -m venv --without-pip /opt/venv \
    && python3 -m pip --python /opt/venv/bin/python install --no-deps --require-hashes \
        -r /requirements.txt
COPY common common
RUN python3 -m pip --python /opt/venv/bin/python install --no-deps ./common
# botocore's service models: only those the functions call (s3, sqs, secretsmanager) and those
# its credential providers may call (sts, sso, sso-oidc, signin). botocore lists every model
# folder (about 440) when it makes its first client, 30-60 ms of a cold start; the rest is 27 MB.
# tests/unit/test_infra.py keeps this list in step with the code and botocore's providers.
ARG BOTOCORE_SERVICES="s3 sqs secretsmanager sts sso sso-oidc signin"
RUN set -eu; \
    for dir in /opt/venv/lib/python3*/site-packages/botocore/data/*/; do \
        case " ${BOTOCORE_SERVICES} " in \
            *" $(basename "$dir") "*) ;; \
            *) rm -rf "$dir" ;; \
        esac; \
    done

# ---------------------------------------------------------------- ffmpeg: minimal static build
FROM ${PYTHON_IMAGE} AS ffmpeg
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    for f in /etc/apt/sources.list.d/*.sources; do \
        [ -e "$f" ] && sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"; \
    done; \
    if [ -s /etc/apt/sources.list ]; then \
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >> /etc/apt/sources.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev make nasm pkg-config dpkg-dev \
        xz-utils libmp3lame-dev
WORKDIR /build
RUN apt-get source ffmpeg && mv ffmpeg-*/ src
# The same build script as the native stack's (make tools): one list of what ffmpeg keeps.
COPY infra/ffmpeg/build.sh /build/
RUN sh /build/build.sh /build/src /opt/ffmpeg

# ---------------------------------------------------------------- runtime, shared by all three
FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
# FFMPEG_BINARY: only upload_record's image has ffmpeg (below); naming it here spares the other
# two a PATH search when settings load.
ENV APP_DIR=/app PORT=8080 HOME=/tmp FFMPEG_BINARY=ffmpeg
EXPOSE 8080
# The probe is plain sockets under `python -I -S`: importing urllib would cost more than it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-I", "-S", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ.get('PORT', '8080'))), 2); s.settimeout(3); s.sendall(b'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n'); raise SystemExit(0 if s.recv(64).split(b' ')[1:2] == [b'200'] else 1)"]
USER 10001:10001
CMD ["python", "-m", "common.platform.entrypoint"]

FROM runtime AS function-create_user
FROM runtime AS function-get_record
FROM runtime AS function-upload_record
COPY --from=ffmpeg /opt/ffmpeg/bin/ffmpeg /usr/local/bin/ffmpeg
ENV FFMPEG_BINARY=/usr/local/bin/ffmpeg

# ---------------------------------------------------------------- the image
FROM function-${FUNCTION}
ARG FUNCTION
ENV FUNCTION_TARGET=${FUNCTION}
COPY functions/${FUNCTION}/main.py /app/functions/${FUNCTION}/main.py
