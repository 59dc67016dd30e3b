-- The OpenResty-style gate's Redis script (bench/run.sh, bench/scale.sh): the reservation most
-- flash-sale gates built on nginx + Lua do, one EVALSHA per buyer.
--
-- KEYS[1] stock    string int: units left
-- KEYS[2] buyers   set of user ids that hold a unit
-- ARGV[1] user id
--
-- Returns  1  won (the user is recorded, stock decremented)
--          0  sold out (nothing changed)
--         -1  repeat buyer (nothing changed)
-- Lighter than flashgate's lua/reserve.lua: no reservation record, no audit counters, no time,
-- no batch, no per-user quantity; what flashgate does on top is listed in bench/README.md.
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
if stock < 1 then
  return 0
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return -1
end
redis.call('DECR', KEYS[1])
return 1
