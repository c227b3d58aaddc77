#!/bin/sh
# Container entrypoint: `miniinfer serve` configured from MINIINFER_* environment variables (Kubernetes
# ConfigMaps, compose `environment:`), with extra command-line options passed through:
#
#   docker run miniinfer:cpu                         -> miniinfer serve --host 0.0.0.0 --port 8000 ...
#   docker run miniinfer:cpu --max-num-seqs 64       -> the same plus --max-num-seqs 64
#   docker run miniinfer:cpu miniinfer generate ...  -> any other command runs as given
#
# MINIINFER_DRY_RUN=1 prints the command instead of running it (the tests use it).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    # The first argument is not an option: run it as a command (a shell, `miniinfer convert`, ...).
    exec "$@"
fi

set -- serve --host "${MINIINFER_HOST:-0.0.0.0}" --port "${MINIINFER_PORT:-8000}" "$@"
# Optional settings: each becomes its option when set and not empty.
add() {
    if [ -n "${2:-}" ]; then
        EXTRA="${EXTRA:-} $1 $2"
    fi
}
EXTRA=""
add --model "${MINIINFER_MODEL:-}"
add --served-model-name "${MINIINFER_SERVED_MODEL_NAME:-}"
add --device "${MINIINFER_DEVICE:-}"
add --dtype "${MINIINFER_DTYPE:-}"
add --max-model-len "${MINIINFER_MAX_MODEL_LEN:-}"
add --max-num-seqs "${MINIINFER_MAX_NUM_SEQS:-}"
add --num-kv-blocks "${MINIINFER_NUM_KV_BLOCKS:-}"
add --max-waiting "${MINIINFER_MAX_WAITING:-}"
add --request-timeout "${MINIINFER_REQUEST_TIMEOUT:-}"
add --shutdown-timeout "${MINIINFER_SHUTDOWN_TIMEOUT:-}"
add --grpc-port "${MINIINFER_GRPC_PORT:-}"
add --log-level "${MINIINFER_LOG_LEVEL:-}"
add --seed "${MINIINFER_SEED:-}"
# Values never hold spaces (paths, numbers, names), so word splitting of EXTRA is safe here.
# shellcheck disable=SC2086
set -- "$@" ${EXTRA}

if [ "${MINIINFER_DRY_RUN:-0}" = "1" ]; then
    echo miniinfer "$@"
    exit 0
fi
exec miniinfer "$@"
