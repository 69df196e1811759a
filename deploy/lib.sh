# shellcheck shell=bash
# What deploy/install.sh and deploy/uninstall.sh share. Sourced by both (after their own
# `set -euo pipefail`), never run: it only sets names and defines functions. It travels with
# them (the sdist's `recursive-include deploy *`); neither script is installed onto the box.
#
# Sets D (DESTDIR without a trailing slash, empty for the running system), VENV, GROUP.

# shellcheck disable=SC2034 # VENV and GROUP are the callers' names
D=${DESTDIR:-}
D=${D%/}
VENV=/opt/gpuguard
GROUP=gpuguard

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 1; }
host() { # a change to the running system: done, or only shown under DESTDIR
    if [ -n "$D" ]; then note "DESTDIR: would run: $*"; else note "$*"; "$@"; fi
}
usage() { # --help: the calling script's header comment, from line 2 to its `set -e` line
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
need_root() {
    [ -n "$D" ] || [ "$(id -u)" -eq 0 ] || die "run as root (or set DESTDIR)"
}
