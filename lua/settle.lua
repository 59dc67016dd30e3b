-- flashgate: record what happened to a held reservation once the backend
-- answered: `sold` (the backend took the order) or `uncertain` (we cannot
-- know: timeout after sending, reset mid-response). Both keep the unit and
-- the user's slot; `uncertain` is left for reconciliation.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua;
-- stock and buyers are passed so every script declares the same key set)
-- ARGV[1] reservation id
-- ARGV[2] target state: 'sold' | 'uncertain'
--
-- Returns 1 if the reservation moved from held, 0 (no-op) otherwise.

local id = ARGV[1]
local to = ARGV[2]
if to ~= 'sold' and to ~= 'uncertain' then
  return redis.error_reply('ERR flashgate settle: target state must be sold or uncertain')
end

local rec = redis.call('HGET', KEYS[3], id)
if not rec then
  return 0
end
local state, qty_s, unix_ms, user = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
local qty = tonumber(qty_s)
if not state or not qty then
  return redis.error_reply('ERR flashgate settle: malformed reservation record')
end
if state ~= 'held' then
  return 0
end

redis.call('HSET', KEYS[3], id, to .. '|' .. qty .. '|' .. unix_ms .. '|' .. user)
redis.call('HINCRBY', KEYS[4], 'res:held', -1)
redis.call('HINCRBY', KEYS[4], 'units:held', -qty)
redis.call('HINCRBY', KEYS[4], 'res:' .. to, 1)
redis.call('HINCRBY', KEYS[4], 'units:' .. to, qty)
return 1
