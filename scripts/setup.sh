#!/usr/bin/env bash
# Installs what livemig needs on a fresh Debian machine. Idempotent; needs root for apt.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The bench's chart needs a font for its labels.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# userfaultfd-sys (post-copy) generates its bindings with bindgen, which loads libclang.
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
# The cluster crate's etcd client (etcd-client) generates its gRPC code with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# The cluster tests start their own etcd members.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
export DEBIAN_FRONTEND=noninteractive
updated=0
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  apt-get update -qq && updated=1
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# QEMU, the bench's peer (--peer qemu). Without it the bench runs livemig's rows alone and the
# smoke test says its QEMU rows are SKIPPED, so a failed install is a warning, not a failure.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "setup: installing qemu-system-x86"
  ((updated)) || apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends qemu-system-x86 ||
    echo "setup: WARNING: qemu-system-x86 did not install; bench --peer qemu is unavailable" >&2
fi
# The package may start a system etcd; livemig's tests run their own members.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
if [ ! -e /dev/kvm ]; then
  echo "setup: note: /dev/kvm is missing; VMs cannot run here and KVM tests will report SKIPPED"
fi
echo "setup: ok"
