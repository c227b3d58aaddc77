#!/usr/bin/env bash
# Best effort: Debian's command-line tools that some tests use to validate what we ship, installed with
# apt-get when missing (as root or through passwordless sudo). Tests that need a tool skip, saying so,
# when it is absent, so a machine without apt-get still runs everything else.
#
#   promtool, prometheus   the /metrics exposition and deploy/prometheus (a real server scrapes ours)
#   yamllint, kubectl      deploy/: lint, and client-side validation of the Kubernetes manifests
set -uo pipefail
declare -A PACKAGE=([promtool]=prometheus [prometheus]=prometheus [yamllint]=yamllint [kubectl]=kubectl)
missing=()
for tool in "${!PACKAGE[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE[$tool]}")
done
if [ ${#missing[@]} -eq 0 ]; then echo "tools: promtool, prometheus, yamllint, kubectl present"; exit 0; fi
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if ! command -v apt-get >/dev/null 2>&1; then echo "tools: missing ($packages), no apt-get: their tests skip"; exit 0; fi
if [ "$(id -u)" -eq 0 ]; then run=(); elif sudo -n true 2>/dev/null; then run=(sudo -n); else
    echo "tools: missing ($packages), not root: their tests skip"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
echo "tools: installing $packages with apt-get"
# shellcheck disable=SC2086
"${run[@]}" apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1 \
    || { "${run[@]}" apt-get update -q >/dev/null 2>&1 \
         && "${run[@]}" apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1; } \
    || echo "tools: apt-get could not install $packages: their tests skip"
for tool in "${!PACKAGE[@]}"; do command -v "$tool" >/dev/null 2>&1 && echo "tools: $tool ok"; done
exit 0
