-- eva-ws publish v3
-- KEYS[1] meta hash, KEYS[2] history stream, then KEYS[3] idempotency key (when ARGV[6] is not empty), then
-- the state hash and the state order set (when ARGV[7] is given)
-- ARGV[1] epoch candidate, ARGV[2] ttl seconds, ARGV[3] pubsub channel, ARGV[4] history size, ARGV[5] payload,
-- ARGV[6] idempotency window seconds ('' or absent: no idempotency key),
-- ARGV[7] state change ('set' or 'del'), ARGV[8] transaction id, ARGV[9] version, ARGV[10] state max items
local idempotency = ARGV[6] ~= nil and ARGV[6] ~= ''
local idempotency_key = idempotency and KEYS[3] or nil
local state_hash, state_order = nil, nil
if ARGV[7] then
  local first = idempotency and 4 or 3
  state_hash, state_order = KEYS[first], KEYS[first + 1]
end

if idempotency_key then
  local seen = redis.call('GET', idempotency_key)
  if seen then
    local seen_offset, seen_epoch = string.match(seen, '^(%d+):(.+)$')
    return {tonumber(seen_offset), seen_epoch, 1}
  end
end

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  if state_hash then
    redis.call('DEL', state_hash, state_order)
  end
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end

local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local id = string.format('%d', offset)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id .. '-0', 'p', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if state_hash then
  -- A version older than the stored one leaves the state alone: both 'n:<integer>' or both
  -- 's:<timestamp>', and smaller; otherwise the newest publish wins.
  local stored = redis.call('HGET', state_hash, ARGV[8])
  local older = false
  if stored and ARGV[9] ~= '' then
    local version = string.match(stored, '^([^\n]*)\n')
    local kind = string.sub(ARGV[9], 1, 2)
    if version ~= '' and string.sub(version, 1, 2) == kind then
      if kind == 'n:' then
        older = tonumber(string.sub(ARGV[9], 3)) < tonumber(string.sub(version, 3))
      else
        older = string.sub(ARGV[9], 3) < string.sub(version, 3)
      end
    end
  end
  if not older then
    if ARGV[7] == 'del' then
      redis.call('HDEL', state_hash, ARGV[8])
      redis.call('ZREM', state_order, ARGV[8])
    else
      redis.call('HSET', state_hash, ARGV[8], ARGV[9] .. '\n' .. ARGV[5])
      redis.call('ZADD', state_order, offset, ARGV[8])
      local excess = redis.call('ZCARD', state_order) - tonumber(ARGV[10])
      if excess > 0 then
        for _, dropped in ipairs(redis.call('ZPOPMIN', state_order, excess)) do
          redis.call('HDEL', state_hash, dropped)
        end
      end
    end
  end
  redis.call('EXPIRE', state_hash, ARGV[2])
  redis.call('EXPIRE', state_order, ARGV[2])
end
redis.call('PUBLISH', ARGV[3], 'e1:' .. id .. ':' .. epoch .. '\n' .. ARGV[5])
if idempotency_key then
  redis.call('SET', idempotency_key, id .. ':' .. epoch, 'EX', ARGV[6])
end
return {offset, epoch, 0}
