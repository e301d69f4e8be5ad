-- eva-ws publish v2
-- KEYS[1] meta hash, KEYS[2] history stream, KEYS[3] idempotency key (optional)
-- ARGV[1] epoch candidate, ARGV[2] ttl seconds, ARGV[3] pubsub channel, ARGV[4] history size, ARGV[5] payload,
-- ARGV[6] idempotency window seconds (with KEYS[3])
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local seen_offset, seen_epoch = string.match(seen, '^(%d+):(.+)$')
    return {tonumber(seen_offset), seen_epoch, 1}
  end
end

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end

local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local id = string.format('%d', offset)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id .. '-0', 'p', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'e1:' .. id .. ':' .. epoch .. '\n' .. ARGV[5])
if KEYS[3] then
  redis.call('SET', KEYS[3], id .. ':' .. epoch, 'EX', ARGV[6])
end
return {offset, epoch, 0}
