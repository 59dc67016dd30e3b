#!/usr/bin/env bash
# flashgate benchmark, loopback only, bounded in time (~4 minutes).
#
# Starts its own redis-server, two backends (a stub: nginx `return 200`; and bench/backend/main.go,
# a Go net/http server that builds ~1 KB of JSON per request), nginx as a pass-through proxy in
# front of each (upstream keepalive, 2 workers, access log off), an OpenResty-style gate (nginx +
# lua-nginx-module, bench/gate/: one Redis EVALSHA per request, winners proxied to the stub) and
# two flashgate instances (release build; one in front of each backend). Then it measures,
# alternating targets round by round (A B C ..., A B C ..., ...) so machine drift hits every
# target alike:
#   (a) stub backend direct     (b) nginx pass-through      (c) flashgate pass-through
#   (a2) Go backend direct      (b2) nginx -> Go backend    (c2) flashgate -> Go backend
#   (d) flashgate flash route, a distinct user per request, stock that never runs out
#   (d2) the OpenResty-style gate, same wrk script, same stub backend, stock that never runs out
#   (e) flashgate flash route, stock 0: every answer 410 from the local sold-out flag
#   (e2) the gate, stock 0: every answer 410 after its EVALSHA
#   (f) redis-benchmark EVALSHA of lua/reserve.lua, same concurrency, with and without pipelining
#   (g) flash route, a pool of 1,000 buyers cycled (each sends many requests, as in a real sale),
#       identity from a header; (g') the same requests also carrying the buyer's JWT, ignored (the
#       token's bytes alone); (h) the same with an RS256 JWT identity (1,000 tokens made up
#       front, verified once each, then served from flashgate's token cache)
# plus, per target, the proxy's CPU µs per request (flashgate's, or nginx's workers', from
# /proc/<pid>/stat), Redis's CPU µs per request (redis-server's /proc ticks) and Redis commands
# per request (INFO commandstats); flashgate's and Redis's CPU µs per admission summed over all
# flash rounds; peak RSS, idle RSS and the RSS cost of 10,000 idle keep-alive connections.
# How cost grows with connections, SKUs and ledger size: bench/scale.sh.
#
# Writes bench/results/latest.md (+ latest.png when gnuplot is installed) and prints ratios.
# Usage: bench/run.sh            env: ROUNDS=3 DURATION=5 CONNS=64 THREADS=2
#        ONLY=jwt bench/run.sh   (g), (g') and (h) alone, reported in bench/results/jwt.md
#        TARGETS="flash gate" bench/run.sh   a subset of targets (for checking the script)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
IDLE_CONNS=${IDLE_CONNS:-10000}
ONLY=${ONLY:-}

need=()
for b in wrk nginx redis-server redis-benchmark openssl go; do command -v "$b" >/dev/null 2>&1 || need+=("$b"); done
# The gate's nginx modules (lua-nginx-module pulls in NDK and lua-resty-core).
LUA_MODULE=/usr/lib/nginx/modules/ngx_http_lua_module.so
[ -f "$LUA_MODULE" ] || need+=(libnginx-mod-http-lua)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing missing tools (${need[*]})"
  pkgs=(wrk nginx-light redis-server redis-tools openssl golang-go libnginx-mod-http-lua)
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
fi
PATH="$PATH:/usr/sbin"
[ -f "$LUA_MODULE" ] || { echo "bench: $LUA_MODULE is missing (apt package libnginx-mod-http-lua)" >&2; exit 1; }

cargo build --release --locked -q
FG=$PWD/target/release/flashgate
work=$(mktemp -d /tmp/flashgate-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# As many descriptors as allowed (the idle-connections step holds 10,000 of them).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=bench/lib.sh
source bench/lib.sh
PB=$(free_port); PN=$(free_port); PF=$(free_port); PA=$(free_port)
PGO=$(free_port); PNGO=$(free_port); PFGO=$(free_port); PG=$(free_port)

# --- Redis on a private unix socket ---------------------------------------------------------
start_redis "$work/redis.sock"
rcli() { redis-cli -s "$work/redis.sock" "$@"; }

# --- backends, nginx proxies and the OpenResty-style gate --------------------------------------
start_stub "$PB"
start_nginx_proxy "$PN" "$PB"; NGINX_STUB=$NGINX_PID
start_go_backend "$PGO"
start_nginx_proxy "$PNGO" "$PGO"; NGINX_GO=$NGINX_PID
start_gate "$PG" "$PB" "$work/redis.sock"
rcli SET 'gate:{plenty}:stock' 1000000000000 >/dev/null
rcli SET 'gate:{gone}:stock' 0 >/dev/null

# --- JWT keys and a pool of 1,000 buyers' tokens (RS256) ----------------------------------------
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/jwt.pem" 2>/dev/null
python3 bench/jwt_tokens.py "$work/jwt.pem" 1000 "$work/jwks.json" "$work/tokens.txt"

# --- flashgate ----------------------------------------------------------------------------------
cat >"$work/flashgate.yaml" <<EOF
listen: 127.0.0.1:$PF
upstream: { url: "http://127.0.0.1:$PB", pool_max_idle: 1024 }
server: { max_connections: 50000, keep_alive_timeout: 300s, header_read_timeout: 30s }
admin: { listen: "127.0.0.1:$PA", token_env: BENCH_ADMIN_TOKEN }
store: { redis: "redis+unix://$work/redis.sock", connections: 4, response_timeout: 2s }
routes:
  - name: flash
    match: { method: POST, path: "/api/flash/{sku}/buy" }
    identity: { header: X-User-Id }
    sale: { sku: { path_param: sku }, sold_out_recheck: 1h }
  # (g) and (h): the same flash route twice, buyers from a header or from a JWT. A buyer may
  # buy without limit, so every request of the cycled pool is a real admission.
  - name: pool-header
    match: { method: POST, path: "/api/hdr/{sku}/buy" }
    identity: { header: X-User-Id }
    sale: { sku: { path_param: sku }, per_user_limit: 4000000000, sold_out_recheck: 1h }
  - name: pool-jwt
    match: { method: POST, path: "/api/jwt/{sku}/buy" }
    identity:
      jwt: { jwks_file: "$work/jwks.json", algorithms: [RS256], issuer: "https://auth.bench", audience: shop }
    sale: { sku: { path_param: sku }, per_user_limit: 4000000000, sold_out_recheck: 1h }
  - name: rest
    match: { path: "/{*rest}" }
EOF
BENCH_ADMIN_TOKEN=bench RUST_LOG=warn "$FG" serve --config "$work/flashgate.yaml" >"$work/flashgate.log" 2>&1 &
FGPID=$!; pids+=("$FGPID")
# A second instance, same build and server settings, in front of the Go backend (pass-through
# only; flashgate has one upstream per instance).
cat >"$work/flashgate-go.yaml" <<EOF
listen: 127.0.0.1:$PFGO
upstream: { url: "http://127.0.0.1:$PGO", pool_max_idle: 1024 }
server: { max_connections: 50000, keep_alive_timeout: 300s, header_read_timeout: 30s }
routes:
  - name: rest
    match: { path: "/{*rest}" }
EOF
RUST_LOG=warn "$FG" serve --config "$work/flashgate-go.yaml" >"$work/flashgate-go.log" 2>&1 &
FGGOPID=$!; pids+=("$FGGOPID")
for p in "$PB" "$PN" "$PF" "$PA" "$PGO" "$PNGO" "$PFGO" "$PG"; do wait_port "$p"; done
sleep 0.5
idle_rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$FGPID/status")
admin() { "$FG" "$@" --admin "http://127.0.0.1:$PA" --token bench >/dev/null; }
admin stock set plenty 1000000000000
admin stock set gone 0

flash_script "$work/flash-plenty.lua" '"/api/flash/plenty/buy"'
flash_script "$work/flash-gone.lua" '"/api/flash/gone/buy"'
cat >"$work/pool.lua" <<EOF
-- A pool of 1,000 buyers, cycled; each thread starts at its own place in the pool.
local tokens = {}
for line in io.lines("$work/tokens.txt") do tokens[#tokens + 1] = line end
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) n = (tid or 0) * 499 end
request = function()
  n = n + 1
  local i = n % #tokens
  return wrk.format("POST", POOL_PATH, POOL_HEADER, "")
end
EOF
sed 's|POOL_PATH|"/api/hdr/plenty/buy"|; s|POOL_HEADER|{ ["X-User-Id"] = "pool-" .. i }|' "$work/pool.lua" >"$work/pool-header.lua"
sed 's|POOL_PATH|"/api/jwt/plenty/buy"|; s|POOL_HEADER|{ ["Authorization"] = "Bearer " .. tokens[i + 1] }|' "$work/pool.lua" >"$work/pool-jwt.lua"
# (g') the header route with the token sent along (and ignored): the bytes a JWT adds to a
# request, without its verification, to tell the two costs apart.
sed 's|POOL_PATH|"/api/hdr/plenty/buy"|; s|POOL_HEADER|{ ["X-User-Id"] = "pool-" .. i, ["Authorization"] = "Bearer " .. tokens[i + 1] }|' "$work/pool.lua" >"$work/pool-header-token.lua"
# Trip the local sold-out flag once, so (e) measures the steady state after a sell-out.
curl -s -o /dev/null -X POST -H 'X-User-Id: warmup' "http://127.0.0.1:$PF/api/flash/gone/buy"

curl -s -o /dev/null -X POST -H 'X-User-Id: warmup' "http://127.0.0.1:$PG/api/flash/gone/buy"  # loads the gate's script

# Commands the proxies themselves send (commandstats also counts the calls made inside scripts).
redis_calls() { rcli INFO commandstats | awk -F'[:=,]' '/^cmdstat_(evalsha|eval|script|ping|hello|client|select)[:]/ {s+=$3} END {print s+0}'; }

if [ -n "${TARGETS:-}" ]; then read -r -a targets <<<"$TARGETS"
elif [ "$ONLY" = jwt ]; then targets=(hdrpool hdrtok jwtpool)
else targets=(direct nginx flashgate godirect gonginx goflashgate flash gate soldout gatesoldout hdrpool hdrtok jwtpool); fi
declare -A url script proxy label
url[direct]="http://127.0.0.1:$PB/bench"; url[nginx]="http://127.0.0.1:$PN/bench"; url[flashgate]="http://127.0.0.1:$PF/bench"
# The Go backend answers a query it parses into its JSON.
url[godirect]="http://127.0.0.1:$PGO/bench?item=42&ref=bench"; url[gonginx]="http://127.0.0.1:$PNGO/bench?item=42&ref=bench"
url[goflashgate]="http://127.0.0.1:$PFGO/bench?item=42&ref=bench"
url[flash]="http://127.0.0.1:$PF"; url[soldout]="http://127.0.0.1:$PF"
url[gate]="http://127.0.0.1:$PG"; url[gatesoldout]="http://127.0.0.1:$PG"
# The gate is driven by the very scripts that drive flashgate's flash route.
script[flash]="$work/flash-plenty.lua"; script[soldout]="$work/flash-gone.lua"
script[gate]="$work/flash-plenty.lua"; script[gatesoldout]="$work/flash-gone.lua"
url[hdrpool]="http://127.0.0.1:$PF"; url[hdrtok]="http://127.0.0.1:$PF"; url[jwtpool]="http://127.0.0.1:$PF"
script[hdrpool]="$work/pool-header.lua"; script[hdrtok]="$work/pool-header-token.lua"; script[jwtpool]="$work/pool-jwt.lua"
# Whose CPU a target's "proxy CPU" column counts: the flashgate instance, or the nginx workers.
for t in flashgate flash soldout hdrpool hdrtok jwtpool; do proxy[$t]="$FGPID"; done
proxy[goflashgate]="$FGGOPID"
proxy[nginx]=$(nginx_workers "$NGINX_STUB" | xargs); proxy[gonginx]=$(nginx_workers "$NGINX_GO" | xargs)
proxy[gate]=$(nginx_workers "$GATE_PID" | xargs); proxy[gatesoldout]=${proxy[gate]}
uses_redis() { case $1 in flash|soldout|gate|gatesoldout|hdrpool|hdrtok|jwtpool) return 0 ;; *) return 1 ;; esac; }
hz=$(getconf CLK_TCK)
results="$work/results.tsv"
: >"$results"
# results.tsv: round target rps p50 p99 proxy-cpu-µs/req redis-cpu-µs/req redis-cmds/req non-2xx
#              requests proxy-ticks redis-ticks proxy-user-ticks
per_req_us() { awk -v t="$1" -v hz="$hz" -v n="$2" 'BEGIN { if (n>0) printf "%.1f", t/hz/n*1e6; else print "-" }'; }

echo "bench: $ROUNDS rounds x ${#targets[@]} targets x ${DURATION}s, $CONNS connections, $THREADS wrk threads"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    args=(-t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency)
    [ -n "${script[$t]:-}" ] && args+=(-s "${script[$t]}")
    # shellcheck disable=SC2086 # proxy[] holds a list of pids
    c0=$(ticks ${proxy[$t]:-})
    # shellcheck disable=SC2086
    u0=$(uticks ${proxy[$t]:-}); d0=$(ticks "$REDIS_PID"); r0=$(redis_calls)
    out=$(wrk "${args[@]}" "${url[$t]}")
    # shellcheck disable=SC2086
    c1=$(ticks ${proxy[$t]:-})
    # shellcheck disable=SC2086
    u1=$(uticks ${proxy[$t]:-}); d1=$(ticks "$REDIS_PID"); r1=$(redis_calls)
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}'); non2xx=${non2xx:-0}
    errors=$(echo "$out" | awk '/Socket errors/ {print}' | tr -d '\n')
    cpu="-"; pticks="-"; uticks="-"
    if [ -n "${proxy[$t]:-}" ]; then pticks=$((c1 - c0)); uticks=$((u1 - u0)); cpu=$(per_req_us "$pticks" "$reqs"); fi
    rcpu="-"; rpr="-"; rticks="-"
    if uses_redis "$t"; then
      rticks=$((d1 - d0)); rcpu=$(per_req_us "$rticks" "$reqs")
      rpr=$(awk -v a="$r0" -v b="$r1" -v n="$reqs" 'BEGIN { printf "%.3f", (b-a)/n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rcpu" "$rpr" "$non2xx" "$reqs" "$pticks" "$rticks" "$uticks" >>"$results"
    printf '  round %s %-11s %10s req/s  p50 %7s ms  p99 %7s ms  proxy CPU %6s us/req  Redis CPU %6s us/req  redis cmds/req %6s  non-2xx %s %s\n' \
      "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rcpu" "$rpr" "$non2xx" "$errors"
  done
done
peak_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$FGPID/status")

col() { awk -F'\t' -v t="$1" -v c="$2" '$2==t {print $c}' "$results" | median; }
# CPU µs per request of target $1 over all its rounds (column 11: the proxy's, 12: Redis's, 13:
# the proxy's in user mode):
# summed ticks over summed requests, steadier than a median of 10 ms ticks per round.
cpu_per_req() { awk -F'\t' -v t="$1" -v c="$2" -v hz="$hz" '$2==t && $c ~ /^[0-9]+$/ {k+=$c; n+=$10} END { if (n>0) printf "%.1f", k/hz/n*1e6; else print "-" }' "$results"; }
label[direct]="(a) stub backend direct"; label[nginx]="(b) nginx pass-through"; label[flashgate]="(c) flashgate pass-through"
label[godirect]="(a2) Go backend direct (~1 KB JSON per request)"; label[gonginx]="(b2) nginx pass-through -> Go backend"; label[goflashgate]="(c2) flashgate pass-through -> Go backend"
label[flash]="(d) flashgate flash route (distinct users, stock never runs out)"; label[gate]="(d2) OpenResty-style gate, same requests (nginx + Lua, EVALSHA per request)"
label[soldout]="(e) flashgate sold-out route (410)"; label[gatesoldout]="(e2) OpenResty-style gate, stock 0 (410)"
label[hdrpool]="(g) flash route, 1,000 buyers cycled, header identity"; label[hdrtok]="(g') the same, each request also carrying its buyer's JWT (ignored)"; label[jwtpool]="(h) flash route, 1,000 buyers cycled, RS256 JWT identity (cached)"
table() {
  echo "| target | req/s | p50 ms | p99 ms | proxy CPU µs / req | of which user mode | Redis CPU µs / req | Redis cmds / req | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    printf '| %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n' "${label[$t]}" "$(col "$t" 3)" "$(col "$t" 4)" "$(col "$t" 5)" "$(cpu_per_req "$t" 11)" "$(cpu_per_req "$t" 13)" "$(cpu_per_req "$t" 12)" "$(col "$t" 8)" "$(col "$t" 9)"
  done
}
jwt_ratio() {
  echo "- JWT identity / header identity (h / g): $(ratio "$(col jwtpool 3)" "$(col hdrpool 3)")x rps (>= 0.83, i.e. at most 1.2x the cost); flashgate CPU per request $(ratio "$(cpu_per_req jwtpool 11)" "$(cpu_per_req hdrpool 11)")x ($(cpu_per_req jwtpool 11) vs $(cpu_per_req hdrpool 11) µs)"
  echo "- of which the token's bytes alone (g' / g): $(ratio "$(col hdrtok 3)" "$(col hdrpool 3)")x rps; flashgate CPU per request $(ratio "$(cpu_per_req hdrtok 11)" "$(cpu_per_req hdrpool 11)")x"
}
if [ "$ONLY" = jwt ]; then
  mkdir -p bench/results
  md=bench/results/jwt.md
  {
    echo "# flashgate benchmark: JWT identity"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), loopback."
    echo "\`ONLY=jwt bench/run.sh\`: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS THREADS=$THREADS, wrk keep-alive; medians over rounds."
    echo
    table
    echo
    jwt_ratio
  } >"$md"
  cat "$md"
  exit 0
fi

# --- (f) Redis's own ceiling for the same script -------------------------------------------------
rcli SET 'fg:{rb}:stock' 1000000000000 >/dev/null
sha=$(rcli SCRIPT LOAD "$(cat lua/reserve.lua)")
rb() {
  redis-benchmark -s "$work/redis.sock" -c "$CONNS" -n "$1" -r 1000000000 "${@:2}" --csv \
    EVALSHA "$sha" 4 'fg:{rb}:stock' 'fg:{rb}:buyers' 'fg:{rb}:res' 'fg:{rb}:stats' \
    u__rand_int__ 1 1 r__rand_int__-__rand_int__ | tail -1
}
redis_plain=$(rb 200000)
redis_piped=$(rb 500000 -P 16)
csv_field() { echo "$1" | tr -d '"' | cut -d, -f"$2"; }

# --- idle keep-alive connections ------------------------------------------------------------------
before_idle=$(awk '/VmRSS/ {print $2}' "/proc/$FGPID/status")
python3 bench/idle_conns.py 127.0.0.1 "$PF" "$IDLE_CONNS" "$FGPID" >"$work/idle.txt"
idle_added_kb=$(awk '/added_kb/ {print $2}' "$work/idle.txt")
idle_opened=$(awk '/opened/ {print $2}' "$work/idle.txt")

# --- report ---------------------------------------------------------------------------------------
mkdir -p bench/results
md=bench/results/latest.md
{
  echo "# flashgate benchmark"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), loopback."
  echo "\`bench/run.sh\`: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS THREADS=$THREADS, wrk keep-alive; medians over rounds."
  echo
  table
  printf '| (f) redis-benchmark EVALSHA reserve.lua, %s clients | %.0f | %s | %s | - | - | - | 1 | - |\n' "$CONNS" "$(csv_field "$redis_plain" 2)" "$(csv_field "$redis_plain" 5)" "$(csv_field "$redis_plain" 7)"
  printf '| (f) same, pipelined -P 16 | %.0f | %s | %s | - | - | - | 1 | - |\n' "$(csv_field "$redis_piped" 2)" "$(csv_field "$redis_piped" 5)" "$(csv_field "$redis_piped" 7)"
  echo
  echo "flashgate memory: idle RSS $((idle_rss_kb / 1024)) MiB; peak RSS during the run $((peak_rss_kb / 1024)) MiB;"
  echo "$idle_opened idle keep-alive connections added $((idle_added_kb / 1024)) MiB (RSS $((before_idle / 1024)) MiB before)."
} >"$md"

nginx_rps=$(col nginx 3)
{
  echo
  echo "Ratios (targets in brackets):"
  echo "- pass-through, stub backend: flashgate / nginx $(ratio "$(col flashgate 3)" "$nginx_rps")x rps (>= 1.0), p99 $(col flashgate 5) vs $(col nginx 5) ms (<= nginx)"
  echo "- pass-through, Go backend: flashgate / nginx $(ratio "$(col goflashgate 3)" "$(col gonginx 3)")x rps (>= 1.0), p99 $(col goflashgate 5) vs $(col gonginx 5) ms (<= nginx); backend direct $(col godirect 3) req/s"
  echo "- flash admissions: flashgate / openresty-gate = $(ratio "$(col flash 3)" "$(col gate 3)")x (p99 $(col flash 5) vs $(col gate 5) ms)"
  echo "- sold-out: $(ratio "$(col soldout 3)" "$(col gatesoldout 3)")x (flashgate / gate answers at stock 0); Redis cmds per reject: flashgate $(col soldout 8) (0), gate $(col gatesoldout 8)"
  echo "- CPU per admission over all flash rounds: flashgate $(cpu_per_req flash 11) µs, Redis $(cpu_per_req flash 12) µs; gate: nginx workers $(cpu_per_req gate 11) µs, Redis $(cpu_per_req gate 12) µs"
  echo "- CPU per sold-out answer: flashgate $(cpu_per_req soldout 11) µs, Redis $(cpu_per_req soldout 12) µs; gate: nginx workers $(cpu_per_req gatesoldout 11) µs, Redis $(cpu_per_req gatesoldout 12) µs"
  echo "- flash admission / nginx pass-through: $(ratio "$(col flash 3)" "$nginx_rps")x (>= 0.8)"
  echo "- sold-out rejects / nginx pass-through: $(ratio "$(col soldout 3)" "$nginx_rps")x (>= 1.5)"
  echo "- flash admission / Redis EVALSHA ceiling (unpipelined): $(ratio "$(col flash 3)" "$(csv_field "$redis_plain" 2)")x"
  echo "- memory: idle $((idle_rss_kb / 1024)) MiB (<= 15), $idle_opened idle connections +$((idle_added_kb / 1024)) MiB (<= 60)"
  jwt_ratio
} >>"$md"
cat "$md"

if command -v gnuplot >/dev/null 2>&1; then
  for t in "${targets[@]}"; do printf '"%s"\t%s\n' "$t" "$(col "$t" 3)"; done >"$work/chart.dat"
  printf '"redis evalsha"\t%s\n"redis -P16"\t%s\n' "$(csv_field "$redis_plain" 2)" "$(csv_field "$redis_piped" 2)" >>"$work/chart.dat"
  gnuplot <<EOF
set terminal pngcairo size 900,480 noenhanced
set output "bench/results/latest.png"
set title "flashgate benchmark: requests/s (median of $ROUNDS rounds, $CONNS connections, loopback, $(nproc) cores)"
set style data histograms
set style fill solid 0.8
set boxwidth 0.7
set grid ytics
set yrange [0:*]
set xtics rotate by -20
unset key
plot "$work/chart.dat" using 2:xtic(1) linecolor rgb "#3b7dd8"
EOF
  echo "chart: bench/results/latest.png"
fi
