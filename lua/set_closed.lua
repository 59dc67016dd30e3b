-- flashgate: close or reopen a sale, and tell every instance, in one atomic step.
--
-- The flag is a field of the stats hash, which reserve.lua already reads: closing costs a
-- buyer no extra key and no extra round trip. The event goes out from the SKU's own node
-- (on a Redis Cluster, its slot's master), so the other instances hear it in order with the
-- sale's stock events.
--
-- KEYS: the sale's four keys (stock, buyers, res, stats), as every flashgate script gets them.
-- ARGV[1] '1' to close, '0' to reopen.
-- Returns 'ok'.

-- Cross-instance events: tell every flashgate instance, over pub/sub on '<prefix>:events',
-- as '<what> <value> <sku>'. Prefix and SKU are read back from the stock key
-- '<prefix>:{<sku>}:stock' (a prefix never contains '{').
local function publish(what, value)
  local prefix, sku = string.match(KEYS[1], '^(.-):{(.*)}:stock$')
  if prefix then
    redis.call('PUBLISH', prefix .. ':events', what .. ' ' .. value .. ' ' .. sku)
  end
end

if ARGV[1] == '1' then
  redis.call('HSET', KEYS[4], 'closed', '1')
elseif ARGV[1] == '0' then
  redis.call('HDEL', KEYS[4], 'closed')
else
  return redis.error_reply('ERR flashgate set_closed: ARGV[1] is 1 (close) or 0 (reopen)')
end
publish('closed', ARGV[1])
return 'ok'
