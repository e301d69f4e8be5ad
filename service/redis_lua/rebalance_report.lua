-- eva-ws rebalance: record this pod's connection count, drop stale pods, sum the live ones.
-- KEYS[1] the report hash. ARGV[1] pod id, ARGV[2] count (-1 removes the pod), ARGV[3] stale after ms.
-- Returns {live pods, total connections of live pods}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local count = tonumber(ARGV[2])
local stale_ms = tonumber(ARGV[3])
if count >= 0 then
  redis.call('HSET', KEYS[1], ARGV[1], count .. ':' .. now_ms)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local flat = redis.call('HGETALL', KEYS[1])
local pods, total = 0, 0
for i = 1, #flat, 2 do
  local sep = string.find(flat[i + 1], ':', 1, true)
  local n = tonumber(string.sub(flat[i + 1], 1, sep - 1))
  local at = tonumber(string.sub(flat[i + 1], sep + 1))
  if now_ms - at > stale_ms then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    pods = pods + 1
    total = total + n
  end
end
redis.call('PEXPIRE', KEYS[1], stale_ms * 2)
return {pods, total}
