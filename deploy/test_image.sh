#!/usr/bin/env bash
# Build the project's Dockerfile with podman (vfs storage, chroot isolation: no Docker engine, no
# container runtime needed) on a local Debian bookworm base, run the server from the image's root
# filesystem with chroot in a network namespace of its own (loopback only: offline), and check
# /health, a chat completion, /metrics, the image's HEALTHCHECK and the non-root user. Then check the
# compose file and the Prometheus config with their own tools and scrape a live server with a real
# Prometheus. Run as root (apt, mounts, chroot): `make test-image`.
#
# Environment:
#   IMAGE_CONTEXT  head (default): build from `git archive HEAD`, a clean checkout;
#                  worktree: tracked and untracked-but-not-ignored files as they are now
#   BASE_IMAGE     build on this image instead of the local bookworm base (e.g. python:3.11-slim
#                  where a registry is reachable)
#   TORCH_WHEEL_DIR  folder served to the build as --find-links (default: the torch==2.13.0 wheel the
#                  host's pip resolves, downloaded into .cache/image/wheels)
#   IMAGE_LAYERS=true  keep the build's intermediate layers (faster reruns, several GB more with vfs)
#   SKIP_APT=1     do not apt-get install the tools
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=$ROOT/.cache/image
IMAGE=localhost/treespec:test
BASE_TAG=localhost/treespec-base:bookworm
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
mkdir -p "$CACHE"
PODMAN=(podman --storage-driver vfs --root "$CACHE/storage" --runroot "$CACHE/run"
        --cgroup-manager cgroupfs --events-backend file)

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "test-image needs root (apt-get, mount, chroot)" >&2
    exit 2
fi

# 1. Tools (idempotent: apt-get skips what is installed).
if [ -z "${SKIP_APT:-}" ]; then
    need=()
    for pair in podman:podman mmdebstrap:mmdebstrap docker-compose:docker-compose \
                prometheus:prometheus promtool:prometheus unshare:util-linux ip:iproute2; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "apt-get install ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
fi

# 2. Compose and Prometheus configs, checked by their own tools.
log "docker-compose config"
docker-compose -f deploy/docker-compose.yml config --quiet
docker-compose -f deploy/docker-compose.yml --profile gpu config --services
log "promtool check config"
promtool check config deploy/prometheus.yml

# 3. Base image: Debian bookworm (python3 is 3.11) made with mmdebstrap, cached. It trusts the host's
#    local CAs (/usr/local/share/ca-certificates: on these machines an egress proxy re-signs TLS) and
#    points pip at the system bundle (PIP_CERT); the Dockerfile itself assumes nothing of the kind.
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$BASE_TAG
    if ! "${PODMAN[@]}" image exists "$BASE_TAG"; then
        if [ ! -s "$CACHE/base-bookworm.tar" ]; then
            log "mmdebstrap bookworm base"
            mmdebstrap --mode=root --variant=minbase --format=tar \
                --include=python3,python3-venv,ca-certificates,passwd \
                --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
                --dpkgopt='path-exclude=/usr/share/locale/*' \
                --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
                --customize-hook='chroot "$1" update-ca-certificates' \
                bookworm "$CACHE/base-bookworm.tar.partial"
            mv "$CACHE/base-bookworm.tar.partial" "$CACHE/base-bookworm.tar"
        fi
        log "podman import $BASE_TAG"
        "${PODMAN[@]}" import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["python3"]' "$CACHE/base-bookworm.tar" "$BASE_TAG"
    fi
fi

# 4. torch wheel, served to the build on loopback (the build sees the host network, not its files).
WHEELS=${TORCH_WHEEL_DIR:-$CACHE/wheels}
if [ -z "${TORCH_WHEEL_DIR:-}" ]; then
    log "torch==2.13.0 as the host's pip resolves it"
    "$HOST_PY" -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" torch==2.13.0 | tail -n 2
fi
ls -l "$WHEELS"
WHEEL_PORT=$("$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >"$CACHE/wheel-server.log" 2>&1 &
WHEEL_SERVER=$!
trap 'kill $WHEEL_SERVER 2>/dev/null || true' EXIT

# 5. Build context: a clean checkout of HEAD, or the working tree's non-ignored files.
CONTEXT=$CACHE/context
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
case "${IMAGE_CONTEXT:-head}" in
    head) git archive HEAD | tar -x -C "$CONTEXT"; echo "context: git archive $(git rev-parse --short HEAD)";;
    worktree) git ls-files -z -c -o --exclude-standard | tar --null -T - -c | tar -x -C "$CONTEXT"
              echo "context: working tree";;
    *) echo "IMAGE_CONTEXT must be head or worktree" >&2; exit 2;;
esac

log "podman build (base $BASE_IMAGE)"
start=$(date +%s)
# --format docker keeps the HEALTHCHECK (OCI images have none). vfs stores every layer as a full copy,
# so intermediate layers are not kept unless IMAGE_LAYERS=true (a rerun then reuses them).
nice "${PODMAN[@]}" build --isolation chroot --network host --format docker --layers="${IMAGE_LAYERS:-false}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
    -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT" 2>&1 | tee "$CACHE/build.log"
build_s=$(( $(date +%s) - start ))
kill $WHEEL_SERVER 2>/dev/null || true
"${PODMAN[@]}" image prune -f >/dev/null   # the previous build's image, untagged by this one

# 6. Run the image's command from its root filesystem and check it.
log "run from the image's root filesystem"
cpu=()
ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1 && cpu=(--expect-cpu-torch)
python3 deploy/image_run.py --podman "${PODMAN[*]}" --image "$IMAGE" "${cpu[@]}"

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $(( size / 1000000 )) MB, build ${build_s}s (log: $CACHE/build.log)"

# 7. A real Prometheus scraping a live server on loopback (pytest, marker `image`).
log "Prometheus against a live server"
OMP_NUM_THREADS=1 "$HOST_PY" -m pytest -q -m image tests/image
log "image $IMAGE: $(( size / 1000000 )) MB, build ${build_s}s: all checks passed"
