#!/usr/bin/env bash
# Installs what livemig needs on a fresh Debian machine. Idempotent; needs root for apt.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The bench: QEMU as the peer (--peer qemu), a font for the chart's labels.
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
if [ ! -e /dev/kvm ]; then
  echo "setup: note: /dev/kvm is missing; VMs cannot run here and KVM tests will report SKIPPED"
fi
echo "setup: ok"
