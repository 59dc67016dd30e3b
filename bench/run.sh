#!/usr/bin/env bash
# flashgate benchmark, loopback only, bounded in time (~3-4 minutes).
#
# Starts its own redis-server, a stub backend (nginx `return 200`), nginx as a pass-through
# proxy (upstream keepalive, 2 workers, access log off) and flashgate (release build), then
# measures, alternating targets round by round (A B C D E, A B C D E, ...) so machine drift
# hits every target alike:
#   (a) backend direct          (b) nginx pass-through      (c) flashgate pass-through
#   (d) flashgate flash route, a distinct user per request, stock that never runs out
#   (e) flashgate flash route, stock 0: every answer 410 from the local sold-out flag
#   (f) redis-benchmark EVALSHA of lua/reserve.lua, same concurrency, with and without pipelining
#   (g) flash route, a pool of 1,000 buyers cycled (each sends many requests, as in a real sale),
#       identity from a header; (g') the same requests also carrying the buyer's JWT, ignored (the
#       token's bytes alone); (h) the same with an RS256 JWT identity (1,000 tokens made up
#       front, verified once each, then served from flashgate's token cache)
# plus flashgate's CPU seconds per 10k requests, peak RSS, Redis commands per request, idle RSS
# and the RSS cost of 10,000 idle keep-alive connections.
#
# Writes bench/results/latest.md (+ latest.png when gnuplot is installed) and prints ratios.
# Usage: bench/run.sh            env: ROUNDS=3 DURATION=5 CONNS=64 THREADS=2
#        ONLY=jwt bench/run.sh   (g), (g') and (h) alone, reported in bench/results/jwt.md
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
IDLE_CONNS=${IDLE_CONNS:-10000}
ONLY=${ONLY:-}

need=()
for b in wrk nginx redis-server redis-benchmark openssl; do command -v "$b" >/dev/null 2>&1 || need+=("$b"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing missing tools (${need[*]})"
  pkgs=(wrk nginx-light redis-server redis-tools openssl)
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
fi
PATH="$PATH:/usr/sbin"

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
ulimit -n 65536 2>/dev/null || true

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
PB=$(free_port); PN=$(free_port); PF=$(free_port); PA=$(free_port)

# --- Redis on a private unix socket ---------------------------------------------------------
redis-server --port 0 --unixsocket "$work/redis.sock" --save "" --appendonly no \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do redis-cli -s "$work/redis.sock" ping >/dev/null 2>&1 && break; sleep 0.05; done
rcli() { redis-cli -s "$work/redis.sock" "$@"; }

# --- stub backend and nginx proxy -------------------------------------------------------------
cat >"$work/backend.conf" <<EOF
worker_processes 1; pid $work/backend.pid; error_log $work/backend.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$PB; location / { return 200 "ok\n"; } } }
EOF
cat >"$work/proxy.conf" <<EOF
worker_processes 2; pid $work/proxy.pid; error_log $work/proxy.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  upstream shop { server 127.0.0.1:$PB; keepalive 128; }
  server { listen 127.0.0.1:$PN;
    location / { proxy_pass http://shop; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
nginx -p "$work" -c "$work/backend.conf" & pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" & pids+=($!)

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
FGPID=$!; pids+=($FGPID)
wait_port "$PB"; wait_port "$PN"; wait_port "$PF"; wait_port "$PA"
sleep 0.5
idle_rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$FGPID/status")
admin() { "$FG" "$@" --admin "http://127.0.0.1:$PA" --token bench >/dev/null; }
admin stock set plenty 1000000000000
admin stock set gone 0

cat >"$work/flash.lua" <<'EOF'
-- Every request a new user: per-user dedupe never answers, each request is a real admission.
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) prefix = "u" .. tostring(tid) .. "-" .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9)) .. "-" end
request = function()
  n = n + 1
  return wrk.format("POST", SKU_PATH, { ["X-User-Id"] = prefix .. n }, "")
end
EOF
sed 's|SKU_PATH|"/api/flash/plenty/buy"|' "$work/flash.lua" >"$work/flash-plenty.lua"
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
sed 's|SKU_PATH|"/api/flash/gone/buy"|' "$work/flash.lua" >"$work/flash-gone.lua"
# Trip the local sold-out flag once, so (e) measures the steady state after a sell-out.
curl -s -o /dev/null -X POST -H 'X-User-Id: warmup' "http://127.0.0.1:$PF/api/flash/gone/buy"

# Commands flashgate itself sends (commandstats also counts the calls made inside scripts).
redis_calls() { rcli INFO commandstats | awk -F'[:=,]' '/^cmdstat_(evalsha|eval|script|ping|hello|client|select)[:]/ {s+=$3} END {print s+0}'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$FGPID/stat"; }
to_ms() { # wrk prints 1.23ms / 456.00us / 1.20s
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v+0 } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000 } else print v }'
}

if [ "$ONLY" = jwt ]; then targets=(hdrpool hdrtok jwtpool); else targets=(direct nginx flashgate flash soldout hdrpool hdrtok jwtpool); fi
declare -A url script
url[direct]="http://127.0.0.1:$PB/bench"; url[nginx]="http://127.0.0.1:$PN/bench"; url[flashgate]="http://127.0.0.1:$PF/bench"
url[flash]="http://127.0.0.1:$PF"; url[soldout]="http://127.0.0.1:$PF"
script[flash]="$work/flash-plenty.lua"; script[soldout]="$work/flash-gone.lua"
url[hdrpool]="http://127.0.0.1:$PF"; url[hdrtok]="http://127.0.0.1:$PF"; url[jwtpool]="http://127.0.0.1:$PF"
script[hdrpool]="$work/pool-header.lua"; script[hdrtok]="$work/pool-header-token.lua"; script[jwtpool]="$work/pool-jwt.lua"
hz=$(getconf CLK_TCK)
results="$work/results.tsv"
: >"$results"

echo "bench: $ROUNDS rounds x ${#targets[@]} targets x ${DURATION}s, $CONNS connections, $THREADS wrk threads"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    args=(-t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency)
    [ -n "${script[$t]:-}" ] && args+=(-s "${script[$t]}")
    c0=$(cpu_ticks); r0=$(redis_calls)
    out=$(wrk "${args[@]}" "${url[$t]}")
    c1=$(cpu_ticks); r1=$(redis_calls)
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
    p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}'); non2xx=${non2xx:-0}
    errors=$(echo "$out" | awk '/Socket errors/ {print}' | tr -d '\n')
    case $t in flashgate|flash|soldout|hdrpool|hdrtok|jwtpool) cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.3f", (b-a)/hz/n*10000 }') ;; *) cpu="-" ;; esac
    case $t in flash|soldout|hdrpool|hdrtok|jwtpool) rpr=$(awk -v a="$r0" -v b="$r1" -v n="$reqs" 'BEGIN { printf "%.3f", (b-a)/n }') ;; *) rpr="-" ;; esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rpr" "$non2xx" "$reqs" >>"$results"
    printf '  round %s %-9s %10s req/s  p50 %7s ms  p99 %7s ms  cpu/10k %6s s  redis/req %6s  non-2xx %s %s\n' \
      "$round" "$t" "$rps" "$p50" "$p99" "$cpu" "$rpr" "$non2xx" "$errors"
  done
done
peak_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$FGPID/status")

median() { sort -n | awk '{a[NR]=$1} END { if (NR==0 || a[1] !~ /^[0-9.]+$/) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
col() { awk -F'\t' -v t="$1" -v c="$2" '$2==t {print $c}' "$results" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b>0) printf "%.2f", a/b; else print "-" }'; }
declare -A label
label[direct]="(a) backend direct"; label[nginx]="(b) nginx pass-through"; label[flashgate]="(c) flashgate pass-through"
label[flash]="(d) flashgate flash route (distinct users, stock never runs out)"; label[soldout]="(e) flashgate sold-out route (410)"
label[hdrpool]="(g) flash route, 1,000 buyers cycled, header identity"; label[hdrtok]="(g') the same, each request also carrying its buyer's JWT (ignored)"; label[jwtpool]="(h) flash route, 1,000 buyers cycled, RS256 JWT identity (cached)"
table() {
  echo "| target | req/s | p50 ms | p99 ms | flashgate CPU s / 10k req | Redis cmds / req | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    printf '| %s | %.0f | %s | %s | %s | %s | %s |\n' "${label[$t]}" "$(col "$t" 3)" "$(col "$t" 4)" "$(col "$t" 5)" "$(col "$t" 6)" "$(col "$t" 7)" "$(col "$t" 8)"
  done
}
jwt_ratio() {
  echo "- JWT identity / header identity (h / g): $(ratio "$(col jwtpool 3)" "$(col hdrpool 3)")x rps (>= 0.83, i.e. at most 1.2x the cost); flashgate CPU per request $(ratio "$(col jwtpool 6)" "$(col hdrpool 6)")x ($(col jwtpool 6) vs $(col hdrpool 6) s / 10k)"
  echo "- of which the token's bytes alone (g' / g): $(ratio "$(col hdrtok 3)" "$(col hdrpool 3)")x rps; flashgate CPU per request $(ratio "$(col hdrtok 6)" "$(col hdrpool 6)")x"
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
  printf '| (f) redis-benchmark EVALSHA reserve.lua, %s clients | %.0f | %s | %s | - | 1 | - |\n' "$CONNS" "$(csv_field "$redis_plain" 2)" "$(csv_field "$redis_plain" 5)" "$(csv_field "$redis_plain" 7)"
  printf '| (f) same, pipelined -P 16 | %.0f | %s | %s | - | 1 | - |\n' "$(csv_field "$redis_piped" 2)" "$(csv_field "$redis_piped" 5)" "$(csv_field "$redis_piped" 7)"
  echo
  echo "flashgate memory: idle RSS $((idle_rss_kb / 1024)) MiB; peak RSS during the run $((peak_rss_kb / 1024)) MiB;"
  echo "$idle_opened idle keep-alive connections added $((idle_added_kb / 1024)) MiB (RSS $((before_idle / 1024)) MiB before)."
} >"$md"

nginx_rps=$(col nginx 3)
{
  echo
  echo "Ratios (targets in brackets):"
  echo "- flashgate pass-through / nginx: $(ratio "$(col flashgate 3)" "$nginx_rps")x rps (>= 1.0), p99 $(col flashgate 5) vs $(col nginx 5) ms (<= nginx)"
  echo "- flash admission / nginx pass-through: $(ratio "$(col flash 3)" "$nginx_rps")x (>= 0.8)"
  echo "- sold-out rejects / nginx pass-through: $(ratio "$(col soldout 3)" "$nginx_rps")x (>= 1.5), Redis cmds per reject $(col soldout 7) (0)"
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
