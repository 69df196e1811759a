#!/usr/bin/env bash
# Install gpuguard as a systemd service, from a checkout and a built wheel (`make dist`).
#
#   deploy/install.sh [--extras LIST] [--find-links DIR] [--no-index] [--python PY] [WHEEL]
#
#   WHEEL             gpuguard-*.whl (default: the newest dist/gpuguard-*.whl)
#   --extras LIST     also install gpuguard[LIST], e.g. yolo (torch: gigabytes, minutes)
#   --find-links DIR  look for dependencies in DIR too (pip --find-links)
#   --no-index        no package index: every dependency must be in --find-links (offline)
#   --python PY       the venv's interpreter (default: python3.13, 3.12, 3.11 or python3; 3.11+)
#
# What goes where: the venv /opt/gpuguard (the package and its base dependencies), symlinks
# /usr/local/bin/gpuguardd and gpuguardctl into it (the unit's ExecStart=, the Slurm and NPD
# files name these paths), /etc/systemd/system/gpuguard.service, /etc/gpuguard/config.toml
# (from config.example.toml, only when absent), the `gpuguard` group, completions, man pages,
# the journal catalog and /usr/share/doc/gpuguard/. Running it again upgrades.
#
# DESTDIR=/some/root puts every file under that root and only prints the groupadd, systemctl
# and journalctl calls it would make. The venv there is not relocatable: its scripts name
# DESTDIR's own python. PIP_* environment variables reach pip.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=deploy/lib.sh
. "$SRC/deploy/lib.sh"   # D, VENV, GROUP; say, note, die, host, usage, need_root

extras='' python='' wheel=''
pip_opts=()
while [ $# -gt 0 ]; do
    case $1 in
        --extras) extras=[${2:?--extras needs a list}]; shift 2 ;;
        --find-links) pip_opts+=(--find-links "${2:?--find-links needs a folder}"); shift 2 ;;
        --no-index) pip_opts+=(--no-index); shift ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$wheel" ] || die "one wheel only"; wheel=$1; shift ;;
    esac
done

if [ -z "$wheel" ]; then
    # shellcheck disable=SC2012 # wheel names are plain: gpuguard-VERSION-TAGS.whl
    wheel=$(ls -t "$SRC"/dist/gpuguard-*.whl 2>/dev/null | head -n 1) || true
    [ -n "$wheel" ] || die "no wheel in $SRC/dist: run \`make dist\` or name one"
fi
case ${wheel##*/} in
    gpuguard-*.whl) [ -f "$wheel" ] || die "no such file: $wheel" ;;
    *) die "not a gpuguard wheel: $wheel" ;;
esac
need_root
for cmd in gpuguardd gpuguardctl; do
    link=$D/usr/local/bin/$cmd
    [ ! -e "$link" ] || [ -L "$link" ] || die "$link exists and is not a symlink: remove it first"
done

own=()
[ "$(id -u)" -eq 0 ] && own=(-o root -g root)
umask 022

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x "$D$VENV/bin/python" ]; then
    say "virtual environment $D$VENV (kept: upgrading in place)"
else
    if [ -z "$python" ]; then
        for p in python3.13 python3.12 python3.11 python3; do
            if command -v "$p" >/dev/null && new_enough "$p"; then python=$p; break; fi
        done
        [ -n "$python" ] || die "no Python 3.11+ found (docs/DEPLOY.md says how to get one); or --python PY"
    fi
    new_enough "$python" || die "$python is older than 3.11"
    say "virtual environment $D$VENV ($("$python" -V))"
    "$python" -m venv "$D$VENV"
fi

say "gpuguard from ${wheel##*/}${extras:+ with $extras}; pip shows its progress"
pip=("$D$VENV/bin/python" -m pip install --disable-pip-version-check "${pip_opts[@]}")
"${pip[@]}" --no-deps --force-reinstall "$wheel"   # the same version again replaces it too
"${pip[@]}" "$wheel$extras"                        # then the dependencies it lacks

say "commands: /usr/local/bin/gpuguardd and gpuguardctl -> $VENV/bin"
install -d -m 0755 "$D/usr/local/bin"
for cmd in gpuguardd gpuguardctl; do ln -sfn "$VENV/bin/$cmd" "$D/usr/local/bin/$cmd"; done

say "unit /etc/systemd/system/gpuguard.service"
install -D -m 0644 "${own[@]}" "$SRC/systemd/gpuguard.service" "$D/etc/systemd/system/gpuguard.service"

config=$D/etc/gpuguard/config.toml
[ -d "$D/etc/gpuguard" ] || install -d -m 0755 "${own[@]}" "$D/etc/gpuguard"
if [ -e "$config" ]; then
    say "config /etc/gpuguard/config.toml: kept as it is"
else
    say "config /etc/gpuguard/config.toml (from config.example.toml)"
    install -m 0644 "${own[@]}" "$SRC/config.example.toml" "$config"
fi

say "group $GROUP (the control socket's admin group)"
if [ -z "$D" ] && getent group "$GROUP" >/dev/null; then
    note "exists"
else
    host groupadd --system "$GROUP"
fi

# where the venv's gpuguard package is (-I: not the checkout in the current folder)
pkg=$("$D$VENV/bin/python" -I -c 'import gpuguard, os; print(os.path.dirname(gpuguard.__file__))')
put() { # put FILE FOLDER: a file of the installed package, or a note that it has none
    if [ -f "$pkg/$1" ]; then
        install -D -m 0644 "${own[@]}" "$pkg/$1" "$D$2/${1##*/}"
        note "$2/${1##*/}"
    else
        note "$1 is not in the installed package: skipped"
    fi
}
say "shell completions"
put ctl/completions/gpuguardctl /usr/share/bash-completion/completions
put ctl/completions/_gpuguardctl /usr/share/zsh/vendor-completions
say "man pages"
mans=("$pkg"/ctl/man/*.1)
if [ -e "${mans[0]}" ]; then
    for m in "${mans[@]}"; do put "ctl/man/${m##*/}" /usr/share/man/man1; done
else
    note "no man pages in the installed package: skipped"
fi

say "journal catalog /usr/lib/systemd/catalog/gpuguard.catalog"
install -D -m 0644 "${own[@]}" "$SRC/systemd/gpuguard.catalog" "$D/usr/lib/systemd/catalog/gpuguard.catalog"
if command -v journalctl >/dev/null; then
    host journalctl --update-catalog || note "failed: \`journalctl -x\` lacks gpuguard's explanations until it works"
else
    note "no journalctl: skipped"
fi

say "docs /usr/share/doc/gpuguard"
install -d -m 0755 "$D/usr/share/doc/gpuguard"
install -m 0644 "${own[@]}" "$SRC/docs/DEPLOY.md" "$SRC/config.example.toml" "$D/usr/share/doc/gpuguard/"

say "systemd"
if [ -n "$D" ] || [ -d /run/systemd/system ]; then
    host systemctl daemon-reload
else
    note "systemd is not running: skipped systemctl daemon-reload"
fi

say "installed $("$D$VENV/bin/gpuguardctl" --version). Next:"
note "usermod -aG $GROUP USER            # who may exclude, reset, run and stop jobs"
note "systemctl enable --now gpuguard      # an upgrade: systemctl restart gpuguard (jobs keep running)"
note "gpuguardctl status"
