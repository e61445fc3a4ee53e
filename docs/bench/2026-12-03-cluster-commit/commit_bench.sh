#!/bin/bash
# Downtime of the same migration between two agents, without and with the cluster's commit.
set -e
B=/tmp/lmbin/livemig
W=$(mktemp -d)
cd $W
export LIVEMIG_INSECURE=true
for i in 0 1 2; do
  etcd --name m$i --data-dir $W/m$i --listen-client-urls http://127.0.0.1:2${i}379 --advertise-client-urls http://127.0.0.1:2${i}379 \
   --listen-peer-urls http://127.0.0.1:2${i}380 --initial-advertise-peer-urls http://127.0.0.1:2${i}380 \
   --initial-cluster m0=http://127.0.0.1:20380,m1=http://127.0.0.1:21380,m2=http://127.0.0.1:22380 \
   --initial-cluster-state new > $W/etcd$i.log 2>&1 &
done
sleep 3
URLS=http://127.0.0.1:20379,http://127.0.0.1:21379,http://127.0.0.1:22379
run() { # mode
  local extra=""
  [ "$1" = cluster ] && extra="--cluster $URLS"
  $B host serve --listen 127.0.0.1:17001 --dir $W/$1-a --name a $extra > $W/$1-a.log 2>&1 &
  PA=$!
  $B host serve --listen 127.0.0.1:17002 --dir $W/$1-b --name b $extra > $W/$1-b.log 2>&1 &
  PB=$!
  sleep 2
  $B host run --host $W/$1-a/host.sock --name vm1 --memory 256M --vcpus 1 > /dev/null
  sleep 3
  local from=a to=b port=17002
  for n in 1 2 3 4 5 6; do
    curl -s --unix-socket $W/$1-$from/host.sock -X POST http://agent/vms/vm1/migrate -H 'Content-Type: application/json' -d "{\"to\":\"127.0.0.1:$port\"}" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("'$1'", r["downtime_ms"], r["phases"]["switchover_ms"])'
    if [ $from = a ]; then from=b; to=a; port=17001; else from=a; to=b; port=17002; fi
    sleep 1
  done
  kill $PA $PB; sleep 0.5
  pkill -f "$W/$1-" || true
}
run plain
run cluster
pkill -f "data-dir $W" || true
