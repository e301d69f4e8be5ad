-- eva-ws publish batch v1
-- Publishes several events in order, each exactly as publish.lua does (one Redis only, never a cluster:
-- the events' keys may lie in different slots). One call instead of one per event.
-- ARGV[1] epoch candidate (for every channel of the batch that has none), ARGV[2] ttl seconds,
-- ARGV[3] history size, ARGV[4] idempotency window seconds, ARGV[5] state max items, then per event i = 0, 1, ...
-- KEYS[5i+1] meta hash, KEYS[5i+2] history stream, KEYS[5i+3] idempotency key ('': none),
-- KEYS[5i+4] state hash, KEYS[5i+5] state order set,
-- ARGV[5i+6] pubsub channel, ARGV[5i+7] payload, ARGV[5i+8] state change ('', 'set' or 'del'),
-- ARGV[5i+9] transaction id, ARGV[5i+10] version.
-- Returns one {offset, epoch, duplicate} per event, as publish.lua does for one.
local epoch_candidate, ttl, history_size, window, max_items = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])

local function publish_one(meta, stream, idempotency_key, state_hash, state_order, pubsub, payload, change, txn, version)
  if idempotency_key ~= '' then
    local seen = redis.call('GET', idempotency_key)
    if seen then
      local seen_offset, seen_epoch = string.match(seen, '^(%d+):(.+)$')
      return {tonumber(seen_offset), seen_epoch, 1}
    end
  end

  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = epoch_candidate
    redis.call('DEL', stream)
    if change ~= '' then
      redis.call('DEL', state_hash, state_order)
    end
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    redis.call('EXPIRE', meta, ttl)
  end

  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  local id = string.format('%d', offset)
  redis.call('XADD', stream, 'MAXLEN', '~', history_size, id .. '-0', 'p', payload)
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', stream, ttl)
  if change ~= '' then
    -- As publish.lua: an older version of the same kind leaves the state alone.
    local stored = redis.call('HGET', state_hash, txn)
    local older = false
    if stored and version ~= '' then
      local stored_version = string.match(stored, '^([^\n]*)\n')
      local kind = string.sub(version, 1, 2)
      if stored_version ~= '' and string.sub(stored_version, 1, 2) == kind then
        if kind == 'n:' then
          older = tonumber(string.sub(version, 3)) < tonumber(string.sub(stored_version, 3))
        else
          older = string.sub(version, 3) < string.sub(stored_version, 3)
        end
      end
    end
    if not older then
      if change == 'del' then
        redis.call('HDEL', state_hash, txn)
        redis.call('ZREM', state_order, txn)
      else
        redis.call('HSET', state_hash, txn, version .. '\n' .. payload)
        redis.call('ZADD', state_order, offset, txn)
        local excess = redis.call('ZCARD', state_order) - max_items
        if excess > 0 then
          for _, dropped in ipairs(redis.call('ZPOPMIN', state_order, excess)) do
            redis.call('HDEL', state_hash, dropped)
          end
        end
      end
    end
    redis.call('EXPIRE', state_hash, ttl)
    redis.call('EXPIRE', state_order, ttl)
  end
  redis.call('PUBLISH', pubsub, 'e1:' .. id .. ':' .. epoch .. '\n' .. payload)
  if idempotency_key ~= '' then
    redis.call('SET', idempotency_key, id .. ':' .. epoch, 'EX', window)
  end
  return {offset, epoch, 0}
end

local replies = {}
for i = 0, #KEYS / 5 - 1 do
  local k, a = 5 * i, 5 * i + 5
  replies[i + 1] = publish_one(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
end
return replies
