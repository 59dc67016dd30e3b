-- flashgate: add ARGV[1] units (may be negative) to a sale's stock, atomically, and record
-- the delta in the units ever added (see set_stock.lua).
--
-- Stock, deltas and totals stay within 2^53-1: Lua numbers are doubles, exact only up to
-- there, so every value is checked before any arithmetic.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua)
-- ARGV[1] delta: decimal integer in -(2^53-1)..2^53-1
--
-- A missing stock key counts as 0. Returns one of:
--   {'ok', stock}
--   {'negative', current}     the stock would go below 0; nothing changed
--   {'overflow', current}     the stock would pass 2^53-1; nothing changed
--   {'added_overflow', added} units ever added would pass 2^53-1; nothing changed
--   {'out_of_range', raw}     the stock key holds a value beyond 2^53-1 (set by an older
--                             flashgate or by hand): set the stock to fix it
-- or an error reply for a malformed delta or a stock key that is not an integer.


-- Cross-instance events: tell every flashgate instance, over pub/sub on '<prefix>:events',
-- as '<what> <value> <sku>'. Prefix and SKU are read back from the stock key
-- '<prefix>:{<sku>}:stock' (a prefix never contains '{').
local function publish(what, value)
  local prefix, sku = string.match(KEYS[1], '^(.-):{(.*)}:stock$')
  if prefix then
    redis.call('PUBLISH', prefix .. ':events', what .. ' ' .. value .. ' ' .. sku)
  end
end

local MAX = 9007199254740991

local d = ARGV[1]
if type(d) ~= 'string' or #d > 17 or not string.match(d, '^-?%d+$') then
  return redis.error_reply('ERR flashgate add_stock: delta must be an integer')
end
local delta = tonumber(d)
if delta > MAX or delta < -MAX then
  return redis.error_reply('ERR flashgate add_stock: delta must be within 2^53-1 either way')
end

local raw = redis.call('GET', KEYS[1])
local current = 0
if raw then
  if not string.match(raw, '^-?%d+$') then
    return redis.error_reply('ERR flashgate add_stock: stock key does not hold an integer')
  end
  if #raw > 17 or tonumber(raw) > MAX or tonumber(raw) < -MAX then
    return {'out_of_range', raw}
  end
  current = tonumber(raw)
end

local next = current + delta
if next < 0 then
  return {'negative', current}
end
if next > MAX then
  return {'overflow', current}
end

local function counter(name)
  return tonumber(redis.call('HGET', KEYS[4], name) or '0') or 0
end
local recorded = tonumber(redis.call('HGET', KEYS[4], 'added') or '')
local added
if recorded then
  added = recorded + delta
else
  added = next + counter('units:held') + counter('units:sold') + counter('units:uncertain')
end
if added > MAX then
  return {'added_overflow', recorded or 0}
end
if added < 0 then
  added = 0
end

redis.call('SET', KEYS[1], string.format('%d', next))
redis.call('HSET', KEYS[4], 'added', string.format('%d', added))
publish('stock', string.format('%d', next))
return {'ok', next}
