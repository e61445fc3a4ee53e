#!/usr/bin/env bash
# Prepares a machine that is itself a VM for `livemig-bench drain`, and puts it back.
#
# Such a machine may hand its free memory back to the hypervisor underneath it (free page
# reporting). Memory handed back is backed again only when touched, and that first touch
# costs whoever touches it: the drains right after the bench boots its guests then cost their
# destinations up to three times the CPU, which no model of the drain can know. `prepare`
# stops the reporting and touches the free memory once, so that every row sees a host like
# a bare-metal one; `restore` reports again from the order saved. The bench notes how much
# was reported while it ran.
#
#   sudo scripts/bench-host.sh prepare
#   sudo scripts/bench-host.sh restore
set -euo pipefail

params=/sys/module/page_reporting/parameters
saved=/run/livemig-bench-host.order
# Above x86-64's largest block order (10): no free block is ever reported.
never=11

if [[ ! -w $params/page_reporting_order ]]; then
    echo "bench-host: no free page reporting to change here ($params), nothing to do"
    exit 0
fi

case "${1:-}" in
prepare)
    order=$(cat "$params/page_reporting_order")
    if [[ $order != "$never" ]]; then
        echo "$order" > "$saved"
    fi
    echo "$never" > "$params/page_reporting_order"
    # Touch all but 1 GiB of the free memory once: what was handed back is backed again.
    free_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    mib=$(( free_kib / 1024 - 1024 ))
    if (( mib > 0 )); then
        python3 - "$mib" <<'EOF'
import mmap, sys
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n)
for i in range(0, n, 4096):
    m[i] = 1
m.close()
EOF
    fi
    echo "bench-host: free page reporting stopped (was order ${order}), ${mib} MiB touched"
    ;;
restore)
    if [[ -f $saved ]]; then
        cat "$saved" > "$params/page_reporting_order"
        rm -f "$saved"
    fi
    echo "bench-host: free page reporting at order $(cat "$params/page_reporting_order")"
    ;;
*)
    echo "usage: $0 prepare|restore" >&2
    exit 2
    ;;
esac
