-- eva-ws connection caps: extend every lease of many keys; re-adds as well, so a lease
-- dropped while Redis was unreachable counts again.
-- KEYS: sorted sets. ARGV[1] lease TTL in ms, then per key its member count and members.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local a = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  for j = a + 1, a + n do redis.call('ZADD', KEYS[i], now + ttl, ARGV[j]) end
  redis.call('PEXPIRE', KEYS[i], ttl)
  a = a + n + 1
end
return #KEYS
