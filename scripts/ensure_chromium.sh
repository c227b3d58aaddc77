#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium for the book's browser check
# (`python scripts/book.py check` drives it with Playwright; Playwright's own browsers are not used).
#
# Already there: print its version. Missing: install the Debian package `chromium` with apt-get, as
# root or through passwordless sudo. Neither possible: say what to install and exit 1.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "chromium: $("$CHROMIUM" --version 2>/dev/null | head -n 1) at $CHROMIUM"
    exit 0
fi

install_with() {  # install_with [sudo -n]
    export DEBIAN_FRONTEND=noninteractive
    "$@" apt-get install -y -q chromium || { "$@" apt-get update -q && "$@" apt-get install -y -q chromium; }
}

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing at $CHROMIUM and this system has no apt-get." >&2
    echo "Install Chromium with your package manager, then run the check with CHROMIUM=/path/to/chromium" >&2
    echo "(or: python scripts/book.py check --chromium /path/to/chromium)." >&2
    exit 1
fi

echo "chromium is missing at $CHROMIUM: installing Debian's chromium package with apt-get"
if [ "$(id -u)" -eq 0 ]; then
    install_with
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    install_with sudo -n
else
    echo "Cannot install it: not root and no passwordless sudo. Run, as root:" >&2
    echo "    apt-get update && apt-get install -y chromium" >&2
    echo "(Debian's package. On Ubuntu, 'chromium' is a snap; install Chromium some other way and pass" >&2
    echo " CHROMIUM=/path/to/chromium.)" >&2
    exit 1
fi

if [ ! -x "$CHROMIUM" ]; then
    echo "apt-get finished but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "chromium: $("$CHROMIUM" --version 2>/dev/null | head -n 1) at $CHROMIUM"
