-- eva-ws presence: many adds and removes in one round trip, in order.
-- KEYS: entries hash, counts hash, per operation (on a cluster, all of one slot).
-- ARGV[1] instance, then per operation: conn_id, entry JSON ('' removes), PUB/SUB channel and
-- message announcing it ('' and '': none). The announcement is a plain PUBLISH: Redis drops it
-- when nobody listens, and keeps no history of it.
local instance = ARGV[1]
for i = 1, #KEYS / 2 do
  local entries, counts = KEYS[2 * i - 1], KEYS[2 * i]
  local conn_id, value, channel, message = ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1]
  if value == '' then
    if redis.call('HDEL', entries, conn_id) == 1 then
      if redis.call('HINCRBY', counts, instance, -1) <= 0 then
        redis.call('HDEL', counts, instance)
      end
    end
  elseif redis.call('HSET', entries, conn_id, value) == 1 then
    redis.call('HINCRBY', counts, instance, 1)
  end
  if channel ~= '' then
    redis.call('PUBLISH', channel, message)
  end
end
return #KEYS / 2
