#!/usr/bin/env bash
# flashgate on a Redis Cluster vs one Redis, same machine, loopback only, bounded (~1-2 min).
#
# Starts one redis-server and a 3-master Redis Cluster (all on TCP, so the transport is the
# same), an nginx `return 200` backend, and two flashgate instances (release build): one on the
# single Redis, one on the cluster. Then alternates wrk rounds between them on the flash route,
# a distinct buyer per request, buying SKUS SKUs in turn (spread over the cluster's masters), and
# reports requests/s, p50/p99, flashgate CPU per 10k admissions and Redis CPU per admission
# (summed over the nodes).
#
# Writes bench/results/cluster.md. Usage: bench/cluster.sh   env: ROUNDS=3 DURATION=5 CONNS=64 SKUS=6
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SKUS=${SKUS:-6}
PATH="$PATH:/usr/sbin"
for b in wrk nginx redis-server redis-cli; do
  command -v "$b" >/dev/null 2>&1 || { echo "bench: $b is missing (bench/run.sh installs it)" >&2; exit 1; }
done

cargo build --release --locked -q
FG=$PWD/target/release/flashgate
work=$(mktemp -d /tmp/flashgate-cluster-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

# free_port, wait_port, ticks, to_ms, median, flash_script
# shellcheck source=bench/lib.sh
source bench/lib.sh
# A port whose cluster bus port (+10000) is free too.
bus_port() { python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p < 55000:
        b = socket.socket()
        try:
            b.bind(("127.0.0.1", p + 10000)); print(p); break
        except OSError: pass'; }

redis() { # port, extra args...
  local port=$1; shift
  mkdir -p "$work/r$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --dir "$work/r$port" --logfile "$work/r$port/redis.log" "$@" &
  pids+=($!)
  for _ in $(seq 1 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis on $port never answered" >&2; exit 1
}
PS=$(free_port); redis "$PS"
nodes=(); for _ in 1 2 3; do p=$(bus_port); nodes+=("$p"); redis "$p" --cluster-enabled yes --cluster-config-file nodes.conf; done
redis-cli --cluster create "${nodes[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$work/create.log"
for p in "${nodes[@]}"; do
  for _ in $(seq 1 200); do redis-cli -p "$p" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
done

PB=$(free_port)
cat >"$work/backend.conf" <<EOF
worker_processes 1; pid $work/backend.pid; error_log $work/backend.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$PB; location / { return 200 "ok\n"; } } }
EOF
nginx -p "$work" -c "$work/backend.conf" & pids+=($!)

seeds=$(printf '"redis://127.0.0.1:%s", ' "${nodes[@]}"); seeds="[${seeds%, }]"
start_fg() { # name, store yaml
  local port admin; port=$(free_port); admin=$(free_port)
  cat >"$work/$1.yaml" <<EOF
listen: 127.0.0.1:$port
upstream: { url: "http://127.0.0.1:$PB", pool_max_idle: 1024 }
server: { max_connections: 50000, keep_alive_timeout: 300s }
admin: { listen: "127.0.0.1:$admin", token_env: BENCH_ADMIN_TOKEN }
store: $2
routes:
  - name: flash
    match: { method: POST, path: "/api/flash/{sku}/buy" }
    identity: { header: X-User-Id }
    sale: { sku: { path_param: sku }, sold_out_recheck: 1h }
  - name: rest
    match: { path: "/{*rest}" }
EOF
  BENCH_ADMIN_TOKEN=bench RUST_LOG=warn "$FG" serve --config "$work/$1.yaml" >"$work/$1.log" 2>&1 &
  pids+=($!)
  eval "PID_$1=$!; PORT_$1=$port; ADMIN_$1=$admin"
  wait_port "$port"; wait_port "$admin"
}
start_fg single "{ redis: \"redis://127.0.0.1:$PS\", connections: 4, response_timeout: 2s }"
start_fg cluster "{ cluster: $seeds, connections: 4, response_timeout: 2s }"
for i in $(seq 1 "$SKUS"); do
  "$FG" stock set "b-$i" 1000000000000 --admin "http://127.0.0.1:$ADMIN_single" --token bench >/dev/null
  "$FG" stock set "b-$i" 1000000000000 --admin "http://127.0.0.1:$ADMIN_cluster" --token bench >/dev/null
done
# Which master owns each SKU (redis-cli --cluster create gives 3 masters 0-5460, 5461-10922, 10923-16383).
masters=$(for i in $(seq 1 "$SKUS"); do redis-cli -p "${nodes[0]}" cluster keyslot "fg:{b-$i}:stock"; done |
  awk '{ if ($1 <= 5460) a++; else if ($1 <= 10922) b++; else c++ } END { printf "%d/%d/%d", a, b, c }')

# A new buyer per request, the SKUs in turn.
flash_script "$work/flash.lua" "\"/api/flash/b-\" .. (n % $SKUS + 1) .. \"/buy\""

hz=$(getconf CLK_TCK)
redis_ticks() { # single | cluster
  local ps; if [ "$1" = single ]; then ps=$PS; else ps="${nodes[*]}"; fi
  local t=0; for p in $ps; do
    pid=$(redis-cli -p "$p" info server | awk -F: '/^process_id/ {print $2}' | tr -d '\r')
    t=$((t + $(ticks "$pid")))
  done; echo "$t"
}
results="$work/results.tsv"; : >"$results"
echo "bench: $ROUNDS rounds x 2 targets x ${DURATION}s, $CONNS connections, $SKUS SKUs (cluster masters: $masters)"
for round in $(seq 1 "$ROUNDS"); do
  for t in single cluster; do
    pid_var="PID_$t"; port_var="PORT_$t"
    c0=$(ticks "${!pid_var}"); r0=$(redis_ticks "$t")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s "$work/flash.lua" "http://127.0.0.1:${!port_var}")
    c1=$(ticks "${!pid_var}"); r1=$(redis_ticks "$t")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}'); non2xx=${non2xx:-0}
    cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.1f", (b-a)/hz/n*1e6 }')
    rcpu=$(awk -v a="$r0" -v b="$r1" -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.1f", (b-a)/hz/n*1e6 }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rcpu" "$non2xx" >>"$results"
    printf '  round %s %-8s %10s req/s  p50 %6s ms  p99 %6s ms  flashgate %5s us/adm  redis %5s us/adm  non-2xx %s\n' \
      "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rcpu" "$non2xx"
  done
done

col() { awk -F'\t' -v t="$1" -v c="$2" '$2==t {print $c}' "$results" | median; }
mkdir -p bench/results
{
  echo "# flashgate on a Redis Cluster vs one Redis"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, loopback, TCP to Redis in both cases."
  echo "\`bench/cluster.sh\`: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS SKUS=$SKUS (on the cluster's masters: $masters); medians over rounds."
  echo
  echo "| store | admissions/s | p50 ms | p99 ms | flashgate CPU µs / admission | Redis CPU µs / admission (all nodes) | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in single cluster; do
    echo "| $t | $(col $t 3) | $(col $t 4) | $(col $t 5) | $(col $t 6) | $(col $t 7) | $(col $t 8) |"
  done
} >bench/results/cluster.md
echo; cat bench/results/cluster.md
