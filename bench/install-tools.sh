#!/usr/bin/env bash
# `make bench` compares the exchange with nginx and Orthanc and loads it with wrk, all from
# Debian's packages: install whichever is missing. policy-rc.d keeps the packages from
# starting their own servers (nginx on port 80, Orthanc on every interface).
set -euo pipefail
missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
command -v unshare >/dev/null || missing+=(util-linux)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "make bench needs these Debian packages: ${missing[*]}" >&2
  exit 1
fi
[ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; }
apt-get update -q && apt-get install -y --no-install-recommends "${missing[@]}"
