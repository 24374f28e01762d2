#!/usr/bin/env bash
# Builds a Debian bookworm base image with Python 3.11 when no container registry is reachable
# (air-gapped hosts, CI). Where python:3.11-slim-bookworm can be pulled, `make images` uses that
# instead and this script is not needed.
#
#   scripts/make-base-image.sh [IMAGE_NAME]      (default: airflow-modelopt-debian-base:bookworm)
set -euo pipefail
name="${1:-airflow-modelopt-debian-base:bookworm}"
if docker image inspect "$name" >/dev/null 2>&1; then
  echo "base image $name already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install -y debootstrap)" >&2; exit 1; }
root="$(mktemp -d /tmp/modelopt-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root ..."
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$root" >/tmp/modelopt-debootstrap.log 2>&1 \
  || { tail -20 /tmp/modelopt-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$name"
echo "imported $name"
