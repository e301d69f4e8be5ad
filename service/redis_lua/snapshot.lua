-- eva-ws snapshot v1
-- KEYS[1] meta hash, KEYS[2] history stream, KEYS[3] state hash, KEYS[4] state order set
-- ARGV[1] epoch candidate, ARGV[2] ttl seconds

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'offset')), redis.call('HVALS', KEYS[3])}
