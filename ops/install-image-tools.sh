#!/usr/bin/env bash
# Debian packages `make image-test` needs: a Docker engine (started by hand, not by systemd) and
# debootstrap for the base image. Idempotent; needs root (CI runs as root).
set -euo pipefail
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: install them as root (apt-get install ${missing[*]})" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# The lock wait: another apt run (unattended upgrades, a colleague) must not fail the build.
apt-get install -y -q -o DPkg::Lock::Timeout=600 "${missing[@]}"
