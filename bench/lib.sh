# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # work, pids and the *_PID results are the caller's globals
# Shared by bench/run.sh, bench/scale.sh and bench/cluster.sh (sourced, not run). The caller sets `work` (its
# temporary directory) and `pids` (an array its EXIT trap kills); every process started here
# is appended to `pids`. Loopback only.

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# CPU ticks (utime + stime) of the given processes, summed; a pid that is gone counts 0.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
# The user-mode share of those ticks (the rest is the kernel's: sockets, wake-ups).
uticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
# An nginx master's worker processes (the ones doing the work).
nginx_workers() { cat "/proc/$1/task/$1/children"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

to_ms() { # wrk prints 1.23ms / 456.00us / 1.20s
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v+0 } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000 } else print v }'
}
median() { sort -n | awk '{a[NR]=$1} END { if (NR==0 || a[1] !~ /^[0-9.]+$/) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a/b; else print "-" }'; }

# redis-server on a private unix socket (and, with a second argument, on 127.0.0.1:PORT too),
# no persistence.  start_redis SOCKET [PORT]; sets REDIS_PID. The socket is world-writable and
# its directory traversable: nginx's workers (the gate) run as an unprivileged user.
start_redis() {
  local tcp=(--port 0)
  [ -n "${2:-}" ] && tcp=(--port "$2" --bind 127.0.0.1)
  chmod 711 "$(dirname "$1")"
  redis-server "${tcp[@]}" --unixsocket "$1" --unixsocketperm 777 --save "" --appendonly no \
    --dir "$(dirname "$1")" --daemonize no >"$1.log" 2>&1 &
  REDIS_PID=$!; pids+=($!)
  for _ in $(seq 1 200); do redis-cli -s "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis on $1 never answered" >&2; exit 1
}

# The stub backend: nginx answering `return 200 "ok\n"`, one worker.  start_stub PORT
start_stub() {
  cat >"$work/stub-$1.conf" <<CONF
worker_processes 1; pid $work/stub-$1.pid; error_log $work/stub-$1.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$1; location / { return 200 "ok\n"; } } }
CONF
  nginx -p "$work" -c "$work/stub-$1.conf" & pids+=($!)
}

# The backend that works per request (bench/backend/main.go, ~1 KB of JSON per answer), built
# once into the work directory.  start_go_backend PORT
start_go_backend() {
  [ -x "$work/go-backend" ] || (cd "$BENCH_ROOT" && go build -o "$work/go-backend" bench/backend/main.go)
  "$work/go-backend" -listen "127.0.0.1:$1" >"$work/go-backend-$1.log" 2>&1 & pids+=($!)
}

# nginx as a pass-through proxy: 2 workers, upstream keepalive, access log off.
# start_nginx_proxy PORT UPSTREAM_PORT; sets NGINX_PID (the master).
start_nginx_proxy() {
  cat >"$work/proxy-$1.conf" <<CONF
worker_processes 2; pid $work/proxy-$1.pid; error_log $work/proxy-$1.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  upstream shop { server 127.0.0.1:$2; keepalive 128; }
  server { listen 127.0.0.1:$1;
    location / { proxy_pass http://shop; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  nginx -p "$work" -c "$work/proxy-$1.conf" & NGINX_PID=$!; pids+=($!)
}

# The OpenResty-style gate: the same nginx (2 workers, upstream keepalive, access log off) with
# Debian's lua-nginx-module; its access phase (bench/gate/access.lua) makes one EVALSHA of
# bench/gate/reserve.lua per request over pooled connections to Redis, then proxies winners.
# Keys: gate:{sku}:stock, gate:{sku}:buyers.  start_gate PORT UPSTREAM_PORT REDIS_SOCKET
# Sets GATE_PID (the master).
start_gate() {
  cat >"$work/gate-$1.conf" <<CONF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 2; pid $work/gate-$1.pid; error_log $work/gate-$1.err; daemon off;
events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  init_by_lua_block {
    local f = assert(io.open("$BENCH_ROOT/bench/gate/reserve.lua"))
    local source = f:read("*a"); f:close()
    local sha = ngx.sha1_bin(source):gsub(".", function(c) return string.format("%02x", c:byte()) end)
    gate_conf = { socket = "unix:$3", sha = sha, source = source }
  }
  init_worker_by_lua_block { math.randomseed(ngx.worker.pid() * 1000 + ngx.now()) }
  upstream shop { server 127.0.0.1:$2; keepalive 128; }
  server { listen 127.0.0.1:$1;
    location ~ ^/api/flash/(?<sku>[A-Za-z0-9_-]+)/buy\$ {
      access_by_lua_file $BENCH_ROOT/bench/gate/access.lua;
      proxy_pass http://shop; proxy_http_version 1.1; proxy_set_header Connection "";
    }
    location / { return 404; } } }
CONF
  nginx -p "$work" -c "$work/gate-$1.conf" & GATE_PID=$!; pids+=($!)
}

# wrk script for a flash route: every request a new user, so per-user dedupe never answers and
# each request is a real admission (or, at stock 0, a real sold-out answer).
# flash_script FILE PATH_EXPR (a Lua expression; `n` is the request's number in its thread)
flash_script() {
  cat >"$1" <<LUA
-- Every request a new user: per-user dedupe never answers, each request is a real admission.
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) prefix = "u" .. tostring(tid) .. "-" .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9)) .. "-" end
request = function()
  n = n + 1
  return wrk.format("POST", $2, { ["X-User-Id"] = prefix .. n }, "")
end
LUA
}
