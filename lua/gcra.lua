-- flashgate: global rate limits (`scope: global`), GCRA on the Redis server's clock.
--
-- Each bucket is one key holding its "theoretical arrival time" (tat), in microseconds of
-- the Redis clock (never a proxy's: instances' clocks drift). A bucket of one token every
-- `period` with `burst` saved up admits a request at `now` when
-- max(tat, now) + period - tolerance <= now   (tolerance = period * burst)
-- and then stores max(tat, now) + period, with a PEXPIRE for when the bucket is full again
-- (an idle key vanishes: a missing key is a full bucket).
--
-- Takes a batch: the requests of one route that asked within the same moment on one
-- flashgate thread, decided one after the other in arrival order. Each request's buckets
-- (up to three: per-IP, per-user, route) are decided together, all or nothing: a request
-- refused by one bucket takes no token from the others. Every key carries the route's hash
-- tag ('<prefix>:{limit:<route>}:...'), so the script stays on one Redis Cluster slot.
--
-- KEYS   the batch's bucket keys, each once
-- ARGV   per request: n (1 to 3), then n triples: key index (into KEYS), period (µs >= 1),
--        tolerance (µs >= period)
-- Returns one reply per request, in order:
--   {0, 0}                      allowed: every bucket gave a token
--   {bucket, wait_ms}           limited: `bucket` (1-based, the request's bucket with the
--                               longest wait) has a token in `wait_ms` (rounded up); nothing
--                               changed
-- or an error reply (nothing changed) for malformed ARGV.

-- Redis < 5 needs this before writing after TIME; newer servers always
-- replicate effects and treat the call as a no-op.
if redis.replicate_commands then
  redis.replicate_commands()
end

local MAX = 9007199254740991

-- Check the whole batch before anything is written.
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if not n or n < 1 or n > 3 or n % 1 ~= 0 or i + 3 * n > #ARGV then
    return redis.error_reply('ERR flashgate gcra: malformed request at ARGV[' .. i .. ']')
  end
  for b = 0, n - 1 do
    local k = tonumber(ARGV[i + 1 + 3 * b])
    local period = tonumber(ARGV[i + 2 + 3 * b])
    local tolerance = tonumber(ARGV[i + 3 + 3 * b])
    if not k or not KEYS[k] or not period or period < 1 or not tolerance
      or tolerance < period or tolerance > MAX then
      return redis.error_reply('ERR flashgate gcra: malformed bucket at ARGV[' .. i .. ']')
    end
  end
  i = i + 1 + 3 * n
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Each key's tat as this batch has left it (read once, then kept here).
local tats = {}
local function tat_of(k)
  local v = tats[k]
  if v == nil then
    v = tonumber(redis.call('GET', KEYS[k]) or '0') or 0
    tats[k] = v
  end
  return v
end

local replies = {}
i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local worst, worst_wait = 0, 0
  local next_tats = {}
  for b = 1, n do
    local base = i + 3 * (b - 1)
    local k, period, tolerance = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    local next_tat = math.max(tat_of(k), now) + period
    local allow_at = next_tat - tolerance
    if allow_at > now then
      if allow_at - now > worst_wait then
        worst, worst_wait = b, allow_at - now
      end
    else
      next_tats[#next_tats + 1] = {k, next_tat}
    end
  end
  if worst > 0 then
    replies[#replies + 1] = {worst, math.ceil(worst_wait / 1000)}
  else
    for _, kt in ipairs(next_tats) do
      local k, next_tat = kt[1], kt[2]
      tats[k] = next_tat
      -- Gone once the bucket is full again (plus a millisecond for rounding).
      local ttl_ms = math.ceil((next_tat - now) / 1000) + 1
      redis.call('SET', KEYS[k], string.format('%.0f', next_tat), 'PX', ttl_ms)
    end
    replies[#replies + 1] = {0, 0}
  end
  i = i + 1 + 3 * n
end
return replies
