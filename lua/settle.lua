-- flashgate: record what happened to held reservations once the backend
-- answered: `sold` (the backend took the order) or `uncertain` (we cannot
-- know: timeout after sending, reset mid-response). Both keep the unit and
-- the user's slot; `uncertain` is left for reconciliation.
--
-- Takes a batch: the winners settled within the same moment on one flashgate
-- thread go in one call, so a busy sale costs Redis about one settle call per
-- batch rather than one per order. On one Redis server a batch may hold
-- several SKUs (one group of four keys each); on a Redis Cluster, one SKU.
--
-- KEYS, four per SKU (a group): stock, buyers, res, stats (see reserve.lua;
-- stock and buyers are passed so every script declares the same key set)
-- ARGV[1] target state: 'sold' | 'uncertain'
-- then, with one group, the reservation ids; with G groups, the G group sizes
-- (ids per SKU, each >= 1, in KEYS order), then the ids, group after group
--
-- Returns one integer per id, in order: 1 if the reservation moved from held,
-- 0 (no-op) if it was not held or is unknown, -1 if its record is malformed.

local to = ARGV[1]
if to ~= 'sold' and to ~= 'uncertain' then
  return redis.error_reply('ERR flashgate settle: target state must be sold or uncertain')
end

local groups = #KEYS / 4
if groups < 1 or groups % 1 ~= 0 then
  return redis.error_reply('ERR flashgate settle: keys come in fours (stock, buyers, res, stats)')
end
local sizes, first = {}, 2
if groups == 1 then
  sizes[1] = #ARGV - 1
else
  local total = 0
  for g = 1, groups do
    local n = tonumber(ARGV[1 + g])
    if not n or n < 1 or n % 1 ~= 0 then
      return redis.error_reply('ERR flashgate settle: group sizes come first, each >= 1')
    end
    sizes[g] = n
    total = total + n
  end
  first = groups + 2
  if #ARGV - first + 1 ~= total then
    return redis.error_reply('ERR flashgate settle: group sizes do not match the ids')
  end
end

local results = {}
local i = first
for g = 1, groups do
  local k_res, k_stats = KEYS[4 * g - 1], KEYS[4 * g]
  local moved, units = 0, 0
  for _ = 1, sizes[g] do
    local id = ARGV[i]
    i = i + 1
    local result = 0
    local rec = redis.call('HGET', k_res, id)
    if rec then
      local state, qty_s, unix_ms, user = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
      local qty = tonumber(qty_s)
      if not state or not qty then
        result = -1
      elseif state == 'held' then
        redis.call('HSET', k_res, id, to .. '|' .. qty .. '|' .. unix_ms .. '|' .. user)
        moved = moved + 1
        units = units + qty
        result = 1
      end
    end
    results[#results + 1] = result
  end
  if moved > 0 then
    redis.call('HINCRBY', k_stats, 'res:held', -moved)
    redis.call('HINCRBY', k_stats, 'units:held', -units)
    redis.call('HINCRBY', k_stats, 'res:' .. to, moved)
    redis.call('HINCRBY', k_stats, 'units:' .. to, units)
  end
end
return results
