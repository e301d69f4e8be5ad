-- eva-ws connection caps: many acquires and releases in one round trip, in order.
-- An acquire drops the key's expired leases, then adds (or extends) its own unless the key
-- already holds `limit` others. KEYS: one sorted set per operation (on a cluster, all of one slot).
-- ARGV[1] lease TTL in ms, then per operation: member, limit (-1 releases). Answers 1 or 0 each.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local answers = {}
for i = 1, #KEYS do
  local key, member, limit = KEYS[i], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  if limit < 0 then
    redis.call('ZREM', key, member)
    answers[i] = 1
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= limit then
      answers[i] = 0
    else
      redis.call('ZADD', key, now + ttl, member)
      redis.call('PEXPIRE', key, ttl)
      answers[i] = 1
    end
  end
end
return answers
