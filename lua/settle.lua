-- flashgate: record what happened to held reservations once the backend
-- answered: `sold` (the backend took the order) or `uncertain` (we cannot
-- know: timeout after sending, reset mid-response). Both keep the unit and
-- the user's slot; `uncertain` is left for reconciliation.
--
-- Takes a batch: the winners of one SKU settled within the same moment go in
-- one call, so a busy sale costs Redis about one settle call per batch rather
-- than one per order.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua;
-- stock and buyers are passed so every script declares the same key set)
-- ARGV[1] target state: 'sold' | 'uncertain'
-- ARGV[2..] reservation ids
--
-- Returns one integer per id, in order: 1 if the reservation moved from held,
-- 0 (no-op) if it was not held or is unknown, -1 if its record is malformed.

local to = ARGV[1]
if to ~= 'sold' and to ~= 'uncertain' then
  return redis.error_reply('ERR flashgate settle: target state must be sold or uncertain')
end

local results = {}
local moved, units = 0, 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local result = 0
  local rec = redis.call('HGET', KEYS[3], id)
  if rec then
    local state, qty_s, unix_ms, user = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
    local qty = tonumber(qty_s)
    if not state or not qty then
      result = -1
    elseif state == 'held' then
      redis.call('HSET', KEYS[3], id, to .. '|' .. qty .. '|' .. unix_ms .. '|' .. user)
      moved = moved + 1
      units = units + qty
      result = 1
    end
  end
  results[#results + 1] = result
end

if moved > 0 then
  redis.call('HINCRBY', KEYS[4], 'res:held', -moved)
  redis.call('HINCRBY', KEYS[4], 'units:held', -units)
  redis.call('HINCRBY', KEYS[4], 'res:' .. to, moved)
  redis.call('HINCRBY', KEYS[4], 'units:' .. to, units)
end
return results
