-- flashgate: set a sale's units left, optionally only if they are still what the caller
-- read (compare-and-set), and record the change in the units ever added.
--
-- Stock, deltas and totals stay within 2^53-1: Lua numbers are doubles, exact only up to
-- there, and a wrong double here would become a wrong stock.
--
-- KEYS[1] stock, KEYS[2] buyers, KEYS[3] res, KEYS[4] stats (see reserve.lua)
-- ARGV[1] new stock: decimal integer 0..2^53-1
-- ARGV[2] the stock the caller expects, or '' to set whatever it is
--
-- `added` (in stats) is the net number of units ever put into the sale: each set adds its
-- difference from the previous stock. So `added == stock + units:held + units:sold +
-- units:uncertain` always holds, and an audit can prove it. A sale without `added` (stocked
-- by an older flashgate), or whose old stock is beyond 2^53-1, starts from that identity.
--
-- Returns one of:
--   {'ok', stock}
--   {'changed', current}     the stock is not ARGV[2]; nothing changed
--   {'changed'}              ARGV[2] was given but the sale is not configured; nothing changed
--   {'added_overflow', added} units ever added would pass 2^53-1; nothing changed
-- or an error reply for arguments outside 0..2^53-1 (the caller checks them first).


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

-- A decimal integer 0..MAX, or nil.
local function units(s)
  if type(s) ~= 'string' or #s > 16 or not string.match(s, '^%d+$') then
    return nil
  end
  local n = tonumber(s)
  if n > MAX then
    return nil
  end
  return n
end

local new = units(ARGV[1])
if not new then
  return redis.error_reply('ERR flashgate set_stock: stock must be an integer from 0 to 2^53-1')
end

local raw = redis.call('GET', KEYS[1])
local current = nil
if raw then
  current = units(raw)
end

if ARGV[2] ~= '' then
  local expect = units(ARGV[2])
  if not expect then
    return redis.error_reply('ERR flashgate set_stock: expect must be an integer from 0 to 2^53-1')
  end
  if not raw then
    return {'changed'}
  end
  if current ~= expect then
    return {'changed', raw}
  end
end

local function counter(name)
  return tonumber(redis.call('HGET', KEYS[4], name) or '0') or 0
end
local recorded = tonumber(redis.call('HGET', KEYS[4], 'added') or '')
local added
if recorded and (current or not raw) then
  added = recorded + new - (current or 0)
else
  added = new + counter('units:held') + counter('units:sold') + counter('units:uncertain')
end
if added > MAX then
  return {'added_overflow', recorded or 0}
end
if added < 0 then
  added = 0
end

redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], 'added', string.format('%d', added))
publish('stock', string.format('%d', new))
return {'ok', new}
