-- flashgate: give a held reservation's units back, at most once; or, for the operator,
-- settle a reservation that needs reconciling.
--
-- Called when the backend definitely did not take the order. Only a `held`
-- reservation is released; any other state (already released, sold,
-- uncertain) makes this a no-op, which is what makes release idempotent.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua)
-- ARGV[1] reservation id
-- ARGV[2] 'release' (default), 'cancel' or 'resolve':
--   'cancel': the caller sent a reserve with this id and never got the reply. A held unit is
--         released as usual; an unknown id gets a tombstone `cancelled|0|unix_ms|`, so that
--         the reserve, if it is still queued (a stalled server runs what waits in its
--         sockets when it thaws), is refused by reserve.lua's id check.
--   'resolve': the operator checked the shop's orders. An `uncertain` reservation, or a
--         `held` one reserved at least ARGV[3] ms ago (by the Redis clock: one left behind by
--         a flashgate that died mid-order), moves to ARGV[4]: 'released' (exactly what a
--         release does: units back, the user's slot freed) or 'sold'. Any other state is a
--         no-op, so resolving twice changes nothing the second time.
-- ARGV[3] (resolve) minimum age in ms of a held reservation; '' never resolves a held one
-- ARGV[4] (resolve) 'released' | 'sold'
--
-- Returns one of:
--   {'released', remaining}               (release, cancel)
--   {'not_held', state}                   (release, cancel) the reservation exists in another
--                                         state (or was just tombstoned: 'cancelled')
--   {'not_held'}                          unknown reservation id (every mode)
--   {'resolved', from, qty, remaining}    (resolve) remaining: the stock after a release;
--                                         -1 after a resolve to sold
--   {'unresolvable', state, age_ms}       (resolve) nothing changed

-- Cross-instance events: tell every flashgate instance, over pub/sub on '<prefix>:events',
-- as '<what> <value> <sku>'. Prefix and SKU are read back from the stock key
-- '<prefix>:{<sku>}:stock' (a prefix never contains '{').
local function publish(what, value)
  local prefix, sku = string.match(KEYS[1], '^(.-):{(.*)}:stock$')
  if prefix then
    redis.call('PUBLISH', prefix .. ':events', what .. ' ' .. value .. ' ' .. sku)
  end
end

-- Redis < 5 needs this before writing after TIME (see reserve.lua).
if redis.replicate_commands then
  redis.replicate_commands()
end

local id, mode = ARGV[1], ARGV[2]
local to = 'released'
if mode == 'resolve' then
  to = ARGV[4]
  if to ~= 'released' and to ~= 'sold' then
    return redis.error_reply('ERR flashgate release: resolve to released or sold')
  end
end

local function now_ms()
  local now = redis.call('TIME')
  return now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
end

local rec = redis.call('HGET', KEYS[3], id)
if not rec then
  if mode == 'cancel' then
    redis.call('HSET', KEYS[3], id, 'cancelled|0|' .. now_ms() .. '|')
    return {'not_held', 'cancelled'}
  end
  return {'not_held'}
end

-- The user comes last so it may itself contain '|'.
local state, qty_s, unix_ms, user = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
local qty = tonumber(qty_s)
if not state or not qty then
  return redis.error_reply('ERR flashgate release: malformed reservation record')
end
if mode == 'resolve' then
  -- A record time that is not a number counts as reserved long ago.
  local age = math.max(tonumber(now_ms()) - (tonumber(unix_ms) or 0), 0)
  local min_age = tonumber(ARGV[3])
  if state ~= 'uncertain' and not (state == 'held' and min_age and age >= min_age) then
    return {'unresolvable', state, age}
  end
elseif state ~= 'held' then
  return {'not_held', state}
end

local remaining = -1
if to == 'released' then
  -- Put the units back. If an operator deleted the stock key (sale switched
  -- off) we do not recreate it: a missing key means "not configured", and a
  -- late release must not quietly reopen the sale.
  remaining = 0
  if redis.call('EXISTS', KEYS[1]) == 1 then
    remaining = math.max(redis.call('INCRBY', KEYS[1], qty), 0)
    -- The units bring a sold-out sale back: the other instances' sold-out flags go.
    if remaining > 0 and remaining <= qty then
      publish('stock', string.format('%d', remaining))
    end
  end
  -- Free the user's slot so they (or anyone) can win the unit again.
  if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then
    redis.call('HDEL', KEYS[2], user)
  end
end

redis.call('HSET', KEYS[3], id, to .. '|' .. qty .. '|' .. unix_ms .. '|' .. user)
redis.call('HINCRBY', KEYS[4], 'res:' .. state, -1)
redis.call('HINCRBY', KEYS[4], 'units:' .. state, -qty)
redis.call('HINCRBY', KEYS[4], 'res:' .. to, 1)
redis.call('HINCRBY', KEYS[4], 'units:' .. to, qty)
if mode == 'resolve' then
  return {'resolved', state, qty, remaining}
end
return {'released', remaining}
