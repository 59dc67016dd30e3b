-- add_stock.lua: add ARGV[1] (may be negative) to KEYS[1] = fg:{sku}:stock, atomically.
-- A missing key counts as 0; a result below zero changes nothing and returns {'negative', current}.
local raw = redis.call('GET', KEYS[1])
local current = 0
if raw then
  current = tonumber(raw)
  if not current then
    return redis.error_reply('ERR flashgate add_stock: stock key does not hold an integer')
  end
end
if current + tonumber(ARGV[1]) < 0 then
  return {'negative', current}
end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(r) == 'table' and r.err then
  return {'overflow', current}
end
return {'ok', r}
