-- The OpenResty-style gate's access phase (bench/run.sh, bench/scale.sh): what a team that puts
-- flash-sale admission into nginx with lua-nginx-module writes. Per request:
--   1. the buyer from X-User-Id (401 without), the SKU from the location's capture;
--   2. one EVALSHA of bench/gate/reserve.lua over a pooled connection to Redis (a unix socket,
--      at most 256 per worker, kept with setkeepalive; NOSCRIPT loads the script and retries once);
--   3. a winner goes on to proxy_pass (upstream keepalive) carrying the X-Flashgate-* headers
--      flashgate would set; a loser is answered here: 410 sold out, 409 repeat buyer, 503 when
--      Redis fails (fail closed).
-- Debian bookworm packages lua-nginx-module and lua-resty-core but not lua-resty-redis, so the
-- few lines of RESP it needs are written here on the cosocket API, as lua-resty-redis does.
-- Configured from init_by_lua: gate_conf = { socket = "unix:/path", sha = "...", source = "..." }

local conf = gate_conf

local function answer(status, reason)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.print('{"error":"', reason, '"}')
  return ngx.exit(status)
end

if ngx.req.get_method() ~= "POST" then
  return answer(405, "method_not_allowed")
end
local user = ngx.var.http_x_user_id
if not user or user == "" then
  return answer(401, "unauthenticated")
end
local sku = ngx.var.sku

local function bulk(s)
  return "$" .. #s .. "\r\n" .. s .. "\r\n"
end

-- One round trip; returns the reply line ("-NOSCRIPT ...", ":1", ...) or nil, err.
local function call(sock, cmd)
  local ok, err = sock:send(cmd)
  if not ok then
    return nil, err
  end
  return sock:receive("*l")
end

local sock = ngx.socket.tcp()
-- Send and read time out at 2 s, as flashgate's store response_timeout in the benches; connect
-- at 10 s, as it includes the wait for a pooled connection (wrk's own timeout is 10 s).
sock:settimeouts(10000, 2000, 2000)
-- At most 256 connections to Redis per worker; requests beyond that wait for a pooled one
-- (`backlog`) instead of opening more: at thousands of client connections, opening one per
-- request overflows Redis's accept queue (EAGAIN on the unix socket, a 503 per failure).
local ok, err = sock:connect(conf.socket, { pool_size = 256, backlog = 8192 })
if not ok then
  ngx.log(ngx.ERR, "gate: redis connect: ", err)
  return answer(503, "unavailable")
end

local keys = bulk("gate:{" .. sku .. "}:stock") .. bulk("gate:{" .. sku .. "}:buyers") .. bulk(user)
local line
line, err = call(sock, "*6\r\n$7\r\nEVALSHA\r\n" .. bulk(conf.sha) .. "$1\r\n2\r\n" .. keys)
if line and line:sub(1, 9) == "-NOSCRIPT" then
  -- Script cache flushed (Redis restarted): load it, then retry once.
  line, err = call(sock, "*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" .. bulk(conf.source))
  if line == "$40" then
    sock:receive(42) -- the SHA we already know, and its CRLF
    line, err = call(sock, "*6\r\n$7\r\nEVALSHA\r\n" .. bulk(conf.sha) .. "$1\r\n2\r\n" .. keys)
  end
end
if not line or line:sub(1, 1) ~= ":" then
  ngx.log(ngx.ERR, "gate: redis: ", err or line)
  sock:close()
  return answer(503, "unavailable")
end
sock:setkeepalive(60000)

local verdict = tonumber(line:sub(2))
if verdict == 0 then
  return answer(410, "sold_out")
elseif verdict < 0 then
  return answer(409, "already_purchased")
end

-- Won: forward with the headers a backend behind flashgate reads (the id is not from a CSPRNG:
-- a benchmark stand-in for flashgate's 128-bit random id).
local r = math.random
ngx.req.set_header("X-Flashgate-Reservation", string.format("%08x%08x%08x%08x", r(0, 0x7fffffff), r(0, 0x7fffffff), r(0, 0x7fffffff), r(0, 0x7fffffff)))
ngx.req.set_header("X-Flashgate-Sku", sku)
ngx.req.set_header("X-Flashgate-User", user)
ngx.req.set_header("X-Flashgate-Quantity", "1")
