-- flashgate: give a held reservation's units back, at most once.
--
-- Called when the backend definitely did not take the order. Only a `held`
-- reservation is released; any other state (already released, sold,
-- uncertain) makes this a no-op, which is what makes release idempotent.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua)
-- ARGV[1] reservation id
-- ARGV[2] 'release' (default) or 'cancel': the caller sent a reserve with this
--         id and never got the reply. A held unit is released as usual; an
--         unknown id gets a tombstone `cancelled|0|unix_ms|`, so that the
--         reserve, if it is still queued (a stalled server runs what waits in
--         its sockets when it thaws), is refused by reserve.lua's id check.
--
-- Returns one of:
--   {'released', remaining}
--   {'not_held', state}   the reservation exists in another state (or was
--                         just tombstoned: 'cancelled')
--   {'not_held'}          unknown reservation id

-- Redis < 5 needs this before writing after TIME (see reserve.lua).
if redis.replicate_commands then
  redis.replicate_commands()
end

local id = ARGV[1]
local rec = redis.call('HGET', KEYS[3], id)
if not rec then
  if ARGV[2] == 'cancel' then
    local now = redis.call('TIME')
    local unix_ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
    redis.call('HSET', KEYS[3], id, 'cancelled|0|' .. unix_ms .. '|')
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
if state ~= 'held' then
  return {'not_held', state}
end

-- Put the units back. If an operator deleted the stock key (sale switched
-- off) we do not recreate it: a missing key means "not configured", and a
-- late release must not quietly reopen the sale.
local remaining = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  remaining = redis.call('INCRBY', KEYS[1], qty)
end

-- Free the user's slot so they (or anyone) can win the unit again.
if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then
  redis.call('HDEL', KEYS[2], user)
end

redis.call('HSET', KEYS[3], id, 'released|' .. qty .. '|' .. unix_ms .. '|' .. user)
redis.call('HINCRBY', KEYS[4], 'res:held', -1)
redis.call('HINCRBY', KEYS[4], 'units:held', -qty)
redis.call('HINCRBY', KEYS[4], 'res:released', 1)
redis.call('HINCRBY', KEYS[4], 'units:released', qty)
if remaining < 0 then remaining = 0 end
return {'released', remaining}
