#!/usr/bin/env bash
# Remove what deploy/install.sh installed.
#
#   deploy/uninstall.sh [--purge]
#
# Stops and disables gpuguard.service first. Jobs it started keep running (KillMode=process):
# stop them before (`gpuguardctl stop NAME`) if they should not. Kept unless --purge: the
# state dir /var/lib/gpuguard (events, quarantine list, job records), /etc/gpuguard
# (config.toml), the unit's drop-ins in /etc/systemd/system/gpuguard.service.d and the
# `gpuguard` group. DESTDIR=/some/root works under that root, as install.sh does.
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/lib.sh"   # D, VENV, GROUP; say, note, die, host, usage, need_root

gone() { # remove files or folders, naming each one that was there
    local p
    for p in "$@"; do
        if [ -e "$p" ] || [ -L "$p" ]; then rm -rf -- "$p"; note "removed ${p#"$D"}"; fi
    done
}

purge=no
case ${1:-} in
    "") ;;
    --purge) purge=yes ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
esac
need_root
systemd=no
[ -z "$D" ] && [ -d /run/systemd/system ] && systemd=yes

say "service"
if [ -n "$D" ]; then
    host systemctl disable --now gpuguard.service
elif [ $systemd = yes ] && [ -e /etc/systemd/system/gpuguard.service ]; then
    host systemctl disable --now gpuguard.service
else
    note "no running systemd or no unit: nothing to stop"
fi

say "files"
for cmd in gpuguardd gpuguardctl; do
    link=$D/usr/local/bin/$cmd
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$VENV/bin/$cmd" ]; then
        gone "$link"
    elif [ -e "$link" ]; then
        note "kept $link: not the installer's symlink"
    fi
done
gone "$D/etc/systemd/system/gpuguard.service" \
    "$D/usr/lib/systemd/catalog/gpuguard.catalog" \
    "$D/usr/share/bash-completion/completions/gpuguardctl" \
    "$D/usr/share/zsh/vendor-completions/_gpuguardctl" \
    "$D"/usr/share/man/man1/gpuguard*.1 \
    "$D/usr/share/doc/gpuguard" \
    "$D$VENV"

if [ $purge = yes ]; then
    say "purge: config, state, drop-ins, group"
    gone "$D/etc/gpuguard" "$D/var/lib/gpuguard" "$D/run/gpuguard" \
        "$D/etc/systemd/system/gpuguard.service.d"
    if [ -n "$D" ] || getent group "$GROUP" >/dev/null; then host groupdel "$GROUP"; fi
else
    say "kept: /etc/gpuguard, /var/lib/gpuguard, the $GROUP group (--purge removes them)"
fi

if command -v journalctl >/dev/null; then host journalctl --update-catalog; fi
if [ -n "$D" ] || [ $systemd = yes ]; then host systemctl daemon-reload; fi
