#!/usr/bin/env bash
# Prepare a fresh Debian machine to run and test cri-shim: the Debian packages
# it drives (containerd, runc, CNI plugins) and the ones its tests use (a real
# registry, busybox for test images), then a virtualenv at .venv with the
# project installed in editable mode. Safe to run again; installs only what is
# missing. Needs root (apt-get, and containerd itself runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  containerd runc containernetworking-plugins iptables iproute2
  busybox-static docker-registry apache2-utils openssl
  util-linux procps ca-certificates
  systemd  # systemd-analyze, which verifies deploy/systemd/ in the tests
  libseccomp-dev pkg-config  # the runc peer is built with cgo and seccomp
  # CRIU (checkpoint/restore) is built from Debian's source package by the peers
  # script: bookworm's criu 3.17 fails `criu check` on kernels 6.13+.
  make gcc libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
  python3-protobuf iproute2 xz-utils
  mmdebstrap  # the DaemonSet image's root filesystem (tests/support/dockerfile.py)
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
export DEBIAN_FRONTEND=noninteractive
# The tests fetch Debian's dynamically linked busybox with `apt-get download`,
# so the package lists must be present even when nothing is missing.
if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-dev: installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry package starts its own service on :5000; the tests
# run private registries instead, so keep the packaged one out of the way.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test,gen]'
# The peers the tests run against, built from published Go modules into a cache
# outside the checkout (tests/peers/build.sh; already-built versions are skipped).
peers=$(tests/peers/build.sh)
# containerd's runc shim runs runc, and runc runs `criu` from PATH: install the
# CRIU peer where every containerd (and `cri-shim check`) finds it.
criu=$(sed -n 's/^CRIU=//p' <<<"$peers")
if [ -n "$criu" ] && ! cmp -s "$criu" /usr/local/sbin/criu; then
  install -m 0755 "$criu" /usr/local/sbin/criu
fi
echo "setup-dev: ready (.venv/bin/cri-shim, containerd $(containerd --version | awk '{print $3}'))"
