#!/bin/sh
# Build and smoke-test the CPU image on a machine that reaches Debian's archive and PyPI but no container
# registry (so no python:3.11-slim base can be pulled): the base image is made with debootstrap.
# Run as root from the repository root. What it does, step by step:
#   1. debootstrap a minimal Debian bookworm with python3 and import it as localhost/debian-python:bookworm;
#   2. podman build --target cpu with that base (torch from TORCH_WHEELS, served over http for the build);
#   3. mount the image and run the server from its file system as uid 10001 (chroot; for machines where
#      `podman run` cannot start containers), then check /health, a completion, /metrics and the health script.
set -eu

ROOTFS=${ROOTFS:-/tmp/miniinfer-rootfs}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}        # a folder with a CPU torch wheel (pip --find-links)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-8123}

if ! podman image exists localhost/debian-python:bookworm; then
    [ -d "$ROOTFS" ] || debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$ROOTFS" http://deb.debian.org/debian
    tar -C "$ROOTFS" -c . | podman import - localhost/debian-python:bookworm
fi

python3 -m http.server 8765 --bind 127.0.0.1 --directory "$TORCH_WHEELS" >/dev/null 2>&1 &
WHEELS_PID=$!
trap 'kill $WHEELS_PID 2>/dev/null || true' EXIT
# --format docker keeps the HEALTHCHECK (the OCI format has no field for it); --isolation chroot runs the
# RUN steps without an OCI runtime (works where crun cannot create cgroups).
podman build --format docker --isolation=chroot --network host -v /etc/ssl/certs:/etc/ssl/certs:ro \
    -f deploy/docker/Dockerfile --target cpu -t localhost/miniinfer:cpu \
    --build-arg PYTHON_IMAGE=localhost/debian-python:bookworm \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ --build-arg PIP_CERT="$CA_BUNDLE" .

MNT=$(podman image mount localhost/miniinfer:cpu)
TMP=$(mktemp -d) && chmod 1777 "$TMP"
mount --bind /proc "$MNT/proc" && mount --bind /dev "$MNT/dev" && mount --bind "$TMP" "$MNT/tmp"
cleanup() {
    [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
    umount "$MNT/tmp" "$MNT/proc" "$MNT/dev" 2>/dev/null || true
    podman image unmount localhost/miniinfer:cpu >/dev/null || true
    kill $WHEELS_PID 2>/dev/null || true
}
trap cleanup EXIT
chroot --userspec=10001:10001 "$MNT" /usr/bin/env -i PATH=/opt/miniinfer/bin:/usr/local/bin:/usr/bin:/bin \
    HOME=/home/miniinfer MINIINFER_HOST=127.0.0.1 MINIINFER_PORT="$PORT" MINIINFER_DEVICE=cpu \
    MINIINFER_CACHE=/tmp/cache /usr/local/bin/miniinfer-entrypoint &
SERVER_PID=$!
for _ in $(seq 1 60); do
    sleep 2
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
done
curl -sf "http://127.0.0.1:$PORT/health"
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "shakespeare", "prompt": "ROMEO.", "max_tokens": 16, "temperature": 0}'
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -q '^miniinfer_num_requests_waiting'
chroot --userspec=10001:10001 "$MNT" /usr/bin/env MINIINFER_PORT="$PORT" /usr/local/bin/miniinfer-healthcheck
echo "image localhost/miniinfer:cpu: healthy, answers completions and /metrics"
