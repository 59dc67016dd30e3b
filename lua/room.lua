-- flashgate: one waiting-room decision, on the Redis server's clock (see src/store/room.rs,
-- whose embedded twin makes the same decisions in-process).
--
-- KEYS  queue (zset id -> score), seen (zset id -> last poll ms), active (zset id -> session
--       end ms), state (hash: mode, seq, tat, shuffled, admitted, minute, minute_n, last_minute_n);
--       all '<prefix>:{room:<route>}:...', one Redis Cluster slot.
-- ARGV  op, total_active, new_per_minute, session_ms, random (0|1), prequeue_from_ms ('' = no
--       pre-queue), prequeue_start_ms, then per op:
--         visit    place ('' = none), new_id, draw (0 <= draw < 2^52), seed
--         refresh  id
--         status   -
--         mode     open | paused | draining
-- Returns
--   {'admitted', id, session_end_ms}
--   {'queued', id, new (0|1), position, queued, active, admitted, last_minute, mode, now_ms}
--   {'refreshed', session_end_ms | -1}
--   {'status', queued, active, admitted, last_minute, mode, now_ms}

if redis.replicate_commands then
  redis.replicate_commands()
end

local queue, seen, active, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
local total, per_minute, session = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local random = ARGV[5] == '1'
local pq_from, pq_start = tonumber(ARGV[6]), tonumber(ARGV[7])
if not total or total < 1 or not per_minute or per_minute < 1 or not session or session < 1 then
  return redis.error_reply('ERR flashgate room: malformed rules')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local SPAN = 4503599627370496 -- 2^52
local PRUNE_MAX = 1000

local function int(n) return string.format('%.0f', n) end

-- Expired sessions, and places idle for a session (at most PRUNE_MAX a call).
redis.call('ZREMRANGEBYSCORE', active, '-inf', now)
local idle = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. int(now - session), 'LIMIT', 0, PRUNE_MAX)
if #idle > 0 then
  redis.call('ZREM', queue, unpack(idle))
  redis.call('ZREM', seen, unpack(idle))
end

local mode = redis.call('HGET', state, 'mode') or 'open'

local function minute_roll()
  local m = math.floor(now / 60000)
  local was = tonumber(redis.call('HGET', state, 'minute') or '-1')
  if m ~= was then
    local last = 0
    if m == was + 1 then last = tonumber(redis.call('HGET', state, 'minute_n') or '0') end
    redis.call('HSET', state, 'minute', int(m), 'minute_n', 0, 'last_minute_n', int(last))
  end
end

local function counts()
  minute_roll()
  return redis.call('ZCARD', queue), redis.call('ZCARD', active),
    tonumber(redis.call('HGET', state, 'admitted') or '0'),
    tonumber(redis.call('HGET', state, 'last_minute_n') or '0')
end

local function status()
  local q, a, adm, last = counts()
  return {'status', q, a, adm, last, mode, now}
end

-- A session starting now ends a session later, never past the pre-queue's opening.
local function session_end()
  local e = now + session
  if pq_from and now < pq_from and e > pq_from then e = pq_from end
  return e
end

if op == 'status' then
  return status()
elseif op == 'mode' then
  local m = ARGV[8]
  if m ~= 'open' and m ~= 'paused' and m ~= 'draining' then
    return redis.error_reply('ERR flashgate room: unknown mode')
  end
  redis.call('HSET', state, 'mode', m)
  mode = m
  return status()
elseif op == 'refresh' then
  local id = ARGV[8]
  if mode == 'draining' or not redis.call('ZSCORE', active, id) then
    return {'refreshed', -1}
  end
  local e = session_end()
  redis.call('ZADD', active, int(e), id)
  return {'refreshed', e}
elseif op ~= 'visit' then
  return redis.error_reply('ERR flashgate room: unknown op')
end

local place, new_id, draw, seed = ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11]
if not new_id or new_id == '' or not draw or not seed then
  return redis.error_reply('ERR flashgate room: malformed visit')
end

-- The pre-queue: everyone queued until the start; at the first call past it, everyone then
-- queued is shuffled once (a draw below zero each, so later arrivals queue behind).
local prequeue = false
if pq_from and pq_start then
  prequeue = now >= pq_from and now < pq_start
  if now >= pq_start and redis.call('HGET', state, 'shuffled') ~= int(pq_start) then
    local all = redis.call('ZRANGE', queue, 0, -1)
    for _, id in ipairs(all) do
      local d = tonumber(string.sub(redis.sha1hex(seed .. id), 1, 13), 16)
      redis.call('ZADD', queue, int(d - SPAN), id)
    end
    redis.call('HSET', state, 'shuffled', int(pq_start))
  end
end

local id, new = place, 0
if place == '' or not redis.call('ZSCORE', queue, place) then
  id, new = new_id, 1
  -- FIFO: the arrival number (two arrivals in one millisecond never tie); random: a draw.
  local score = redis.call('HINCRBY', state, 'seq', 1)
  if random then score = draw % SPAN end
  redis.call('ZADD', queue, int(score), id)
end
local rank = redis.call('ZRANK', queue, id)
local free = total - redis.call('ZCARD', active)

if mode == 'open' and not prequeue and rank < free then
  -- The pace (GCRA): a place is let in only if there is a token for it and for every place
  -- ahead of it: no place takes a session one ahead of it could not have.
  local period = 60000 / per_minute
  local burst = math.max(1, math.floor(per_minute / 6))
  local tat = tonumber(redis.call('HGET', state, 'tat') or '0')
  local base = math.max(tat, now)
  local tokens = math.floor((now + period * burst - base) / period)
  if rank < tokens then
    redis.call('HSET', state, 'tat', string.format('%.17g', base + period))
    redis.call('ZREM', queue, id)
    redis.call('ZREM', seen, id)
    local e = session_end()
    redis.call('ZADD', active, int(e), id)
    redis.call('HINCRBY', state, 'admitted', 1)
    minute_roll()
    redis.call('HINCRBY', state, 'minute_n', 1)
    return {'admitted', id, e}
  end
end

redis.call('ZADD', seen, int(now), id)
local q, a, adm, last = counts()
return {'queued', id, new, rank + 1, q, a, adm, last, mode, now}
