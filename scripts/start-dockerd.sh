#!/usr/bin/env bash
# Makes sure a Docker engine is running: installs Debian's docker.io if dockerd is missing, then
# starts dockerd in the background (log: /tmp/dockerd.log) and waits for it. Idempotent; meant
# for root on Debian bookworm machines without systemd (CI, developer sandboxes).
#
#   scripts/start-dockerd.sh      (DOCKERD_WAIT=60 seconds to wait, DOCKERD_LOG=/tmp/dockerd.log)
set -euo pipefail

wait_s="${DOCKERD_WAIT:-60}"
logfile="${DOCKERD_LOG:-/tmp/dockerd.log}"

die() { echo "start-dockerd: error: $*" >&2; exit 1; }
engine_up() { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }

if engine_up; then
  echo "start-dockerd: Docker engine already running"
  exit 0
fi

sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: cannot install or start dockerd"
  sudo="sudo -n"
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
  command -v apt-get >/dev/null || die "dockerd is not installed and apt-get is not available"
  echo "start-dockerd: installing docker.io (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q >/tmp/start-dockerd-apt.log 2>&1 \
    || { tail -n 20 /tmp/start-dockerd-apt.log >&2; die "apt-get update failed"; }
  $sudo apt-get install -y -q --no-install-recommends docker.io iptables ca-certificates \
    >>/tmp/start-dockerd-apt.log 2>&1 \
    || { tail -n 20 /tmp/start-dockerd-apt.log >&2; die "apt-get install docker.io failed"; }
  hash -r
  command -v dockerd >/dev/null 2>&1 || die "docker.io installed but dockerd is not on PATH"
fi

# The package's postinst may have started it (where an init system exists); check again.
if ! engine_up; then
  if pgrep -x dockerd >/dev/null 2>&1; then
    echo "start-dockerd: dockerd is running but not answering yet; waiting"
  else
    echo "start-dockerd: starting dockerd (log: $logfile)"
    # A stale pid file from a dead daemon keeps a new one from starting.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
      $sudo rm -f /var/run/docker.pid
    fi
    $sudo sh -c "nohup dockerd >>'$logfile' 2>&1 </dev/null &"
  fi
  for _ in $(seq "$wait_s"); do
    engine_up && break
    sleep 1
  done
fi

if ! engine_up; then
  tail -n 30 "$logfile" >&2 2>/dev/null || true
  die "the Docker engine did not come up within ${wait_s}s (see $logfile)"
fi
echo "start-dockerd: Docker engine is up ($(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?'))"
