#!/usr/bin/env bash
# `make test`'s set-up on a fresh Debian machine. As root, apt-get installs the Debian tools the
# tests drive when they are missing; then PostgreSQL and RabbitMQ are started when they are
# installed but stopped. Without root nothing is installed: the missing tools are named instead.
set -uo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=()
# need PACKAGE COMMAND...: the package is installed when the command fails.
need() {
  local package=$1
  shift
  "$@" >/dev/null 2>&1 || missing+=("$package")
}
# The browser tests drive Debian's Chromium (never a downloaded browser).
need chromium test -x /usr/bin/chromium
# The OHIF viewer test fetches the prebuilt @ohif/app with npm. Only when npm is missing:
# Debian's npm conflicts with a nodejs installed from elsewhere.
need npm command -v npm
# The site agent's edge tests talk to real DICOM peers, dcmtk's tools and Orthanc, in private
# network namespaces (unshare, nsenter, ip); Orthanc's DICOMweb plugin publishes to the portal
# in the STOW peer test.
need dcmtk command -v storescp
need orthanc test -x /usr/sbin/Orthanc
need orthanc-dicomweb test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so
need iproute2 command -v ip
need util-linux command -v unshare
# nginx in front of the portal for the X-Accel-Redirect download test.
need nginx test -x /usr/sbin/nginx
# promtool (Debian's prometheus) checks the portal's /metrics text.
need prometheus command -v promtool
# The production layout's tests: systemd-analyze verifies the units, openssl makes a test CA.
need systemd command -v systemd-analyze
need openssl command -v openssl
# The suite's database and broker; their programs even when a server already answers at the
# standard address, since the PostgreSQL restart test runs a server of its own (initdb, pg_ctl)
# and the RabbitMQ cluster test three nodes of its own.
need postgresql compgen -G '/usr/lib/postgresql/*/bin/pg_ctl'
need rabbitmq-server test -x /usr/lib/rabbitmq/bin/rabbitmq-server

if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # policy-rc.d keeps the packages from starting their own daemons (orthanc and nginx would
    # listen on every interface); the ones the suite needs are started below, on 127.0.0.1.
    guard=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    fresh_postgresql=
    [[ " ${missing[*]} " == *" postgresql "* ]] && fresh_postgresql=1
    echo "Installing ${missing[*]} with apt-get"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
    if [ -n "$fresh_postgresql" ]; then
      # The suite connects as postgres over TCP without a password (TEST_DATABASE_URL); only a
      # cluster installed here is opened that way, never one someone configured.
      for hba in /etc/postgresql/*/main/pg_hba.conf; do
        sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
      done
    fi
  else
    echo "Missing for some tests (install as root, or run 'sudo bash tests/services.sh'): ${missing[*]}" >&2
  fi
fi

if command -v pg_ctlcluster >/dev/null && ! listening 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if command -v rabbitmq-server >/dev/null && ! listening 5672; then
  rabbitmq-server -detached
fi
for _ in $(seq 60); do
  { ! command -v pg_ctlcluster >/dev/null || listening 5432; } \
    && { ! command -v rabbitmq-server >/dev/null || listening 5672; } && break
  sleep 1
done
exit 0
