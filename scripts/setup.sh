#!/usr/bin/env bash
# Installs what livemig needs on a fresh Debian machine. Idempotent; needs root for apt.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
if [ ! -e /dev/kvm ]; then
  echo "setup: note: /dev/kvm is missing; VMs cannot run here and KVM tests will report SKIPPED"
fi
echo "setup: ok"
