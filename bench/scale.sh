#!/usr/bin/env bash
# How flashgate's cost grows, loopback only, bounded in time (~4 minutes with the defaults).
# bench/run.sh measures one load level; this measures how the figures move with:
#   1. client connections: requests/s and p99 at 64, 512 and 4,096 connections for nginx
#      pass-through, flashgate pass-through, flashgate's flash route (a distinct buyer per
#      request, stock that never runs out) and the OpenResty-style gate (bench/gate/) on the same
#      requests; stub backend (nginx `return 200`); targets and levels interleaved round by round;
#   2. hot SKUs: flash admissions/s when buyers spread over 1, 100 or 10,000 SKUs (flashgate
#      batches the buyers of one SKU into one script call, so more SKUs mean smaller batches);
#   3. the Redis transport: the flash route with Redis over its unix socket vs over TCP
#      (127.0.0.1; the same redis-server, two flashgate instances alike but for the store URL);
#   4. the ledger: Redis memory per 1,000,000 reservations, filled through lua/reserve.lua itself
#      in batches of 100 buyers (as flashgate sends them), and the gate's buyer set alongside;
#   5. idle connections: RSS of a fresh flashgate holding 100,000 idle keep-alive connections,
#      or as many as this machine's descriptor limit and loopback ports allow (said in the report).
# CPU per request comes from /proc/<pid>/stat (flashgate, nginx workers, redis-server).
#
# Writes bench/results/scale.md (+ scale.png when gnuplot is installed).
# Usage: bench/scale.sh    env: ROUNDS=2 DURATION=5 THREADS=2 CONNS_LIST="64 512 4096"
#                               SKUS_LIST="1 100 10000" RESERVATIONS=1000000 IDLE_TARGET=100000
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-5}
THREADS=${THREADS:-2}
read -r -a CONNS_LIST <<<"${CONNS_LIST:-64 512 4096}"
read -r -a SKUS_LIST <<<"${SKUS_LIST:-1 100 10000}"
RESERVATIONS=${RESERVATIONS:-1000000}
IDLE_TARGET=${IDLE_TARGET:-100000}
PATH="$PATH:/usr/sbin"
for b in wrk nginx redis-server redis-cli python3; do
  command -v "$b" >/dev/null 2>&1 || { echo "scale: $b is missing (bench/run.sh installs it)" >&2; exit 1; }
done
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || { echo "scale: libnginx-mod-http-lua is missing (bench/run.sh installs it)" >&2; exit 1; }

cargo build --release --locked -q
FG=$PWD/target/release/flashgate
work=$(mktemp -d /tmp/flashgate-scale.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# wrk's 4,096 connections and the idle step need descriptors: raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# shellcheck source=bench/lib.sh
source bench/lib.sh
hz=$(getconf CLK_TCK)

# --- processes ---------------------------------------------------------------------------------
PB=$(free_port); PN=$(free_port); PG=$(free_port); PR=$(free_port)
PF=$(free_port); PA=$(free_port); PFT=$(free_port); PFI=$(free_port)
start_redis "$work/redis.sock" "$PR"       # one Redis, on a unix socket and on 127.0.0.1:$PR
rcli() { redis-cli -s "$work/redis.sock" "$@"; }
start_stub "$PB"
start_nginx_proxy "$PN" "$PB"
start_gate "$PG" "$PB" "$work/redis.sock"
rcli SET 'gate:{plenty}:stock' 1000000000000 >/dev/null

# flashgate_conf NAME PORT STORE_URL [ADMIN_PORT]: the flash route plus pass-through, as in run.sh.
flashgate_conf() {
  local admin=""
  [ -n "${4:-}" ] && admin="admin: { listen: \"127.0.0.1:$4\", token_env: BENCH_ADMIN_TOKEN }"
  cat >"$work/$1.yaml" <<EOF
listen: 127.0.0.1:$2
upstream: { url: "http://127.0.0.1:$PB", pool_max_idle: 1024 }
server: { max_connections: 200000, keep_alive_timeout: 300s, header_read_timeout: 30s }
$admin
store: { redis: "$3", connections: 4, response_timeout: 2s }
routes:
  - name: flash
    match: { method: POST, path: "/api/flash/{sku}/buy" }
    identity: { header: X-User-Id }
    sale: { sku: { path_param: sku }, sold_out_recheck: 1h }
  - name: rest
    match: { path: "/{*rest}" }
EOF
}
flashgate_conf fg "$PF" "redis+unix://$work/redis.sock" "$PA"
flashgate_conf fgtcp "$PFT" "redis://127.0.0.1:$PR"
BENCH_ADMIN_TOKEN=bench RUST_LOG=warn "$FG" serve --config "$work/fg.yaml" >"$work/fg.log" 2>&1 &
FGPID=$!; pids+=("$FGPID")
RUST_LOG=warn "$FG" serve --config "$work/fgtcp.yaml" >"$work/fgtcp.log" 2>&1 &
FGTPID=$!; pids+=("$FGTPID")
for p in "$PB" "$PN" "$PG" "$PF" "$PA" "$PFT"; do wait_port "$p"; done
"$FG" stock set plenty 1000000000000 --admin "http://127.0.0.1:$PA" --token bench >/dev/null
NGINX_WORKERS=$(nginx_workers "$NGINX_PID" | xargs); GATE_WORKERS=$(nginx_workers "$GATE_PID" | xargs)

# Stock for the hot-SKU step: hot0 .. hot(N-1), set through flashgate's own set_stock.lua (what
# `flashgate stock set` runs), piped to Redis in one go.
max_skus=$(printf '%s\n' "${SKUS_LIST[@]}" | sort -n | tail -1)
set_sha=$(rcli SCRIPT LOAD "$(cat lua/set_stock.lua)")
awk -v n="$max_skus" -v sha="$set_sha" '
  function bulk(s) { printf "$%d\r\n%s\r\n", length(s), s }
  BEGIN { for (i = 0; i < n; i++) { k = "fg:{hot" i "}:"; printf "*9\r\n"; bulk("EVALSHA"); bulk(sha); bulk("4")
    bulk(k "stock"); bulk(k "buyers"); bulk(k "res"); bulk(k "stats"); bulk("1000000000000"); bulk("") } }' |
  rcli --pipe >/dev/null

# wrk scripts: a distinct buyer per request (bench/lib.sh), on one SKU or spread over N SKUs
# (each thread starts at its own SKU, then takes them in turn).
flash_script "$work/flash-plenty.lua" '"/api/flash/plenty/buy"'
for k in "${SKUS_LIST[@]}"; do
  flash_script "$work/flash-hot$k.lua" "\"/api/flash/hot\" .. ((n + tid * 7919) % $k) .. \"/buy\""
done

redis_calls() { rcli INFO commandstats | awk -F'[:=,]' '/^cmdstat_(evalsha|eval|script|ping|hello|client|select)[:]/ {s+=$3} END {print s+0}'; }
results="$work/results.tsv"
: >"$results"
# measure STEP LABEL CONNS URL SCRIPT PROXY_PIDS: one wrk run; appends to results.tsv
#   step label conns rps p99 non-2xx requests proxy-ticks redis-ticks redis-calls
measure() {
  local args=(-t"$THREADS" -c"$3" -d"${DURATION}s" --latency --timeout 10s) out c0 c1 d0 d1 r0 r1
  [ -n "$5" ] && args+=(-s "$5")
  # shellcheck disable=SC2086 # $6 is a list of pids
  c0=$(ticks $6); d0=$(ticks "$REDIS_PID"); r0=$(redis_calls)
  out=$(wrk "${args[@]}" "$4")
  # shellcheck disable=SC2086
  c1=$(ticks $6); d1=$(ticks "$REDIS_PID"); r1=$(redis_calls)
  local reqs rps p99 non2xx
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}'); non2xx=${non2xx:-0}
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$rps" "$p99" "$non2xx" "$reqs" $((c1 - c0)) $((d1 - d0)) $((r1 - r0)) >>"$results"
  printf '  %-6s %-22s c=%-5s %10s req/s  p99 %8s ms  non-2xx %s %s\n' "$1" "$2" "$3" "$rps" "$p99" "$non2xx" \
    "$(echo "$out" | awk '/Socket errors/ {print}' | tr -d '\n')"
}

echo "scale: ROUNDS=$ROUNDS DURATION=${DURATION}s THREADS=$THREADS conns ${CONNS_LIST[*]}, SKUs ${SKUS_LIST[*]}; descriptors $NOFILE"
for round in $(seq 1 "$ROUNDS"); do
  echo " round $round"
  # 1. connections
  for c in "${CONNS_LIST[@]}"; do
    measure conns "nginx pass-through" "$c" "http://127.0.0.1:$PN/bench" "" "$NGINX_WORKERS"
    measure conns "flashgate pass-through" "$c" "http://127.0.0.1:$PF/bench" "" "$FGPID"
    measure conns "flashgate flash" "$c" "http://127.0.0.1:$PF" "$work/flash-plenty.lua" "$FGPID"
    measure conns "openresty-gate flash" "$c" "http://127.0.0.1:$PG" "$work/flash-plenty.lua" "$GATE_WORKERS"
  done
  # 2. hot SKUs (64 connections)
  for k in "${SKUS_LIST[@]}"; do
    measure skus "flash, $k SKUs" 64 "http://127.0.0.1:$PF" "$work/flash-hot$k.lua" "$FGPID"
  done
  # 3. Redis transport (64 connections)
  measure redis "flash, Redis unix socket" 64 "http://127.0.0.1:$PF" "$work/flash-plenty.lua" "$FGPID"
  measure redis "flash, Redis TCP" 64 "http://127.0.0.1:$PFT" "$work/flash-plenty.lua" "$FGTPID"
done

# Medians over rounds of requests/s (col 4) and p99 (col 5); CPU per request summed over rounds.
pick() { awk -F'\t' -v s="$1" -v l="$2" -v c="$3" -v col="$4" '$1==s && $2==l && $3==c {print $col}' "$results" | median; }
per_req() { # STEP LABEL CONNS COLUMN(8 proxy ticks, 9 redis ticks, 10 redis calls)
  awk -F'\t' -v s="$1" -v l="$2" -v c="$3" -v col="$4" -v hz="$hz" '$1==s && $2==l && $3==c {k+=$col; n+=$7}
    END { if (n == 0) print "-"; else if (col == 10) printf "%.3f", k/n; else printf "%.1f", k/hz/n*1e6 }' "$results"
}
row() { # STEP LABEL CONNS
  printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$2" "$3" "$(pick "$1" "$2" "$3" 4)" "$(pick "$1" "$2" "$3" 5)" \
    "$(per_req "$1" "$2" "$3" 8)" "$(per_req "$1" "$2" "$3" 9)" "$(per_req "$1" "$2" "$3" 10)" "$(pick "$1" "$2" "$3" 6)"
}

# --- 4. the ledger: Redis memory per reservation --------------------------------------------------
# RESERVATIONS buyers, each with a 32-hex-digit reservation id and a 15-byte user id, reserved
# through lua/reserve.lua in batches of 100; then the same buyers through the gate's script (one
# call each). used_memory deltas, scaled to 1,000,000 when RESERVATIONS is smaller.
echo " ledger: $RESERVATIONS reservations"
mem() { rcli INFO memory | awk -F: '/^used_memory:/ {print $2+0}'; }
res_sha=$(rcli SCRIPT LOAD "$(cat lua/reserve.lua)")
gate_sha=$(rcli SCRIPT LOAD "$(cat bench/gate/reserve.lua)")
rcli EVALSHA "$set_sha" 4 'fg:{ledger}:stock' 'fg:{ledger}:buyers' 'fg:{ledger}:res' 'fg:{ledger}:stats' "$RESERVATIONS" '' >/dev/null
rcli SET 'gate:{ledger}:stock' "$RESERVATIONS" >/dev/null
m0=$(mem)
awk -v n="$RESERVATIONS" -v sha="$res_sha" '
  function bulk(s) { printf "$%d\r\n%s\r\n", length(s), s }
  function hex16() { return sprintf("%04x", int(rand() * 65536)) }
  BEGIN { srand(15); for (i = 0; i < n; i += 100) { m = (n - i < 100) ? n - i : 100
    printf "*%d\r\n", 7 + 4 * m; bulk("EVALSHA"); bulk(sha); bulk("4")
    bulk("fg:{ledger}:stock"); bulk("fg:{ledger}:buyers"); bulk("fg:{ledger}:res"); bulk("fg:{ledger}:stats")
    for (j = 0; j < m; j++) { bulk(sprintf("user-%010d", i + j)); bulk("1"); bulk("1")
      bulk(hex16() hex16() hex16() hex16() hex16() hex16() hex16() hex16()) } } }' |
  timeout 300 redis-cli -s "$work/redis.sock" --pipe >"$work/ledger-fg.log"
m1=$(mem)
awk -v n="$RESERVATIONS" -v sha="$gate_sha" '
  function bulk(s) { printf "$%d\r\n%s\r\n", length(s), s }
  BEGIN { for (i = 0; i < n; i++) { printf "*6\r\n"; bulk("EVALSHA"); bulk(sha); bulk("2")
    bulk("gate:{ledger}:stock"); bulk("gate:{ledger}:buyers"); bulk(sprintf("user-%010d", i)) } }' |
  timeout 300 redis-cli -s "$work/redis.sock" --pipe >"$work/ledger-gate.log"
m2=$(mem)
sold_fg=$(rcli HLEN 'fg:{ledger}:res'); sold_gate=$(rcli SCARD 'gate:{ledger}:buyers')
per_million() { awk -v b="$1" -v n="$2" 'BEGIN { if (n > 0) printf "%.0f", b / n * 1e6 / 1048576; else print "-" }'; }
ledger_fg=$(per_million $((m1 - m0)) "$sold_fg"); ledger_gate=$(per_million $((m2 - m1)) "$sold_gate")
scaled=""; [ "$RESERVATIONS" -lt 1000000 ] && scaled=" (measured at $RESERVATIONS and scaled linearly)"

# --- 5. idle keep-alive connections on a fresh flashgate ------------------------------------------
# Each connection costs flashgate one descriptor, and the client one more: the count is capped by
# the descriptor limit (ulimit -Hn) less a margin. Loopback has one destination address:port, so
# past the ephemeral port range the client spreads over source addresses 127.0.0.2, .3, ...
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
ports=$((port_hi - port_lo + 1))
idle_n=$IDLE_TARGET; idle_why="nothing (the target itself)"
if [ $((NOFILE - 1000)) -lt "$idle_n" ]; then idle_n=$((NOFILE - 1000)); idle_why="the descriptor limit (ulimit -Hn $NOFILE, not raisable here)"; fi
sources=""
if [ "$idle_n" -gt $((ports * 9 / 10)) ]; then
  need=$(( (idle_n + ports * 9 / 10 - 1) / (ports * 9 / 10) ))
  sources=$(seq 2 $((need + 1)) | sed 's/^/127.0.0./' | paste -sd,)
fi
cat >"$work/idle.yaml" <<EOF
listen: 127.0.0.1:$PFI
upstream: { url: "http://127.0.0.1:$PB", pool_max_idle: 1024 }
server: { max_connections: 200000, keep_alive_timeout: 300s, header_read_timeout: 30s }
routes:
  - name: rest
    match: { path: "/{*rest}" }
EOF
RUST_LOG=warn "$FG" serve --config "$work/idle.yaml" >"$work/idle.log" 2>&1 &
FGIPID=$!; pids+=("$FGIPID")
wait_port "$PFI"; sleep 0.5
idle_rss=$(rss_kb "$FGIPID")
echo " idle: $idle_n connections (capped by $idle_why)${sources:+, from $sources}"
python3 bench/idle_conns.py 127.0.0.1 "$PFI" "$idle_n" "$FGIPID" "$sources" >"$work/idle.txt"
idle_added=$(awk '/added_kb/ {print $2}' "$work/idle.txt"); idle_opened=$(awk '/opened/ {print $2}' "$work/idle.txt")

# --- report ---------------------------------------------------------------------------------------
mkdir -p bench/results
md=bench/results/scale.md
{
  echo "# flashgate benchmark: how cost grows"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), loopback."
  echo "\`bench/scale.sh\`: ROUNDS=$ROUNDS DURATION=${DURATION}s THREADS=$THREADS, wrk keep-alive, stub backend (nginx \`return 200\`);"
  echo "req/s and p99: medians over rounds; CPU and Redis commands: totals over rounds per request."
  echo "Proxy CPU is flashgate's, or nginx's workers' for nginx and the gate. Per-request CPU and Redis"
  echo "commands divide what the servers did by the requests wrk counted; wrk does not count the requests"
  echo "still in flight when it stops (up to one per connection), so at 4,096 connections and short runs"
  echo "these read high (by up to connections / requests)."
  echo
  echo "## 1. Client connections"
  echo
  echo "| target | connections | req/s | p99 ms | proxy CPU µs / req | Redis CPU µs / req | Redis cmds / req | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for c in "${CONNS_LIST[@]}"; do
    for l in "nginx pass-through" "flashgate pass-through" "flashgate flash" "openresty-gate flash"; do row conns "$l" "$c"; done
  done
  echo
  for c in "${CONNS_LIST[@]}"; do
    echo "- $c connections: pass-through flashgate / nginx $(ratio "$(pick conns "flashgate pass-through" "$c" 4)" "$(pick conns "nginx pass-through" "$c" 4)")x rps, p99 $(pick conns "flashgate pass-through" "$c" 5) vs $(pick conns "nginx pass-through" "$c" 5) ms; flash admissions flashgate / openresty-gate $(ratio "$(pick conns "flashgate flash" "$c" 4)" "$(pick conns "openresty-gate flash" "$c" 4)")x, p99 $(pick conns "flashgate flash" "$c" 5) vs $(pick conns "openresty-gate flash" "$c" 5) ms"
  done
  echo
  echo "## 2. Hot SKUs (flash route, 64 connections, a distinct buyer per request, SKUs taken in turn)"
  echo
  echo "| target | connections | req/s | p99 ms | flashgate CPU µs / admission | Redis CPU µs / admission | Redis cmds / admission | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for k in "${SKUS_LIST[@]}"; do row skus "flash, $k SKUs" 64; done
  echo
  echo "## 3. Redis transport (flash route, 64 connections)"
  echo
  echo "| target | connections | req/s | p99 ms | flashgate CPU µs / admission | Redis CPU µs / admission | Redis cmds / admission | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  row redis "flash, Redis unix socket" 64
  row redis "flash, Redis TCP" 64
  echo
  echo "- TCP / unix socket: $(ratio "$(pick redis "flash, Redis TCP" 64 4)" "$(pick redis "flash, Redis unix socket" 64 4)")x admissions/s"
  echo
  echo "## 4. Ledger: Redis memory per 1,000,000 reservations$scaled"
  echo
  echo "| ledger | reservations | Redis used_memory per 1,000,000 |"
  echo "|---|---:|---:|"
  echo "| flashgate (lua/reserve.lua: buyers hash + reservation records + stats) | $sold_fg | $ledger_fg MiB |"
  echo "| openresty-gate (bench/gate/reserve.lua: a set of buyers) | $sold_gate | $ledger_gate MiB |"
  echo
  echo "User ids \`user-0000000042\` (15 bytes), reservation ids 32 hex digits; one SKU."
  echo
  echo "## 5. Idle keep-alive connections (a fresh flashgate, pass-through only)"
  echo
  echo "Target $IDLE_TARGET; measured $idle_n, capped by $idle_why; ephemeral ports $port_lo-$port_hi${sources:+; client sources $sources}."
  echo "Idle RSS $((idle_rss / 1024)) MiB; $idle_opened idle connections added $((idle_added / 1024)) MiB ($(awk -v a="$idle_added" -v n="$idle_opened" 'BEGIN { if (n > 0) printf "%.2f", a / n; else print "-" }') KiB each)."
  if [ "$idle_opened" -lt "$IDLE_TARGET" ] 2>/dev/null; then
    echo "At that cost per connection, $IDLE_TARGET would add ~$(awk -v a="$idle_added" -v n="$idle_opened" -v t="$IDLE_TARGET" 'BEGIN { if (n > 0) printf "%.0f", a / n * t / 1024; else print "-" }') MiB (linear extrapolation, not a measurement)."
  fi
} >"$md"
cat "$md"

if command -v gnuplot >/dev/null 2>&1; then
  for c in "${CONNS_LIST[@]}"; do
    printf '%s' "$c"
    for l in "nginx pass-through" "flashgate pass-through" "flashgate flash" "openresty-gate flash"; do printf '\t%s\t%s' "$(pick conns "$l" "$c" 4)" "$(pick conns "$l" "$c" 5)"; done
    echo
  done >"$work/conns.dat"
  gnuplot <<EOF
set terminal pngcairo size 1000,460 noenhanced
set output "bench/results/scale.png"
set multiplot layout 1,2 title "flashgate: how cost grows with client connections (loopback, $(nproc) cores)"
set logscale x 2
set xlabel "client connections"
set grid
set key bottom left
set yrange [0:*]
set title "requests/s"
plot for [i=0:3] "$work/conns.dat" using 1:(column(2+2*i)) with linespoints title word("nginx flashgate flashgate-flash openresty-gate", i+1)
set title "p99 latency, ms"
set key top left
plot for [i=0:3] "$work/conns.dat" using 1:(column(3+2*i)) with linespoints title word("nginx flashgate flashgate-flash openresty-gate", i+1)
unset multiplot
EOF
  echo "chart: bench/results/scale.png"
fi
