-- eva-ws history v2
-- KEYS[1] meta hash, KEYS[2] history stream
-- ARGV[1] epoch candidate, ARGV[2] ttl seconds, ARGV[3] epoch asked for, ARGV[4] first offset wanted ('' = none),
-- ARGV[5] history size

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end

local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local entries = {}
local recovered = 0
if ARGV[4] ~= '' then
  -- The window is the newest ARGV[5] offsets the stream still holds (approximate trimming
  -- may leave a few older ones, never read), found from the oldest entry alone.
  local oldest = offset - tonumber(ARGV[5]) + 1
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #head == 0 then
    oldest = offset + 1
  else
    oldest = math.max(oldest, tonumber(string.match(head[1][1], '^%d+')))
  end
  local first = tonumber(ARGV[4])
  if ARGV[3] == epoch and first >= oldest and first <= offset + 1 then
    recovered = 1
  else
    first = oldest
  end
  if first <= offset then
    local count = string.format('%d', offset - first + 1)
    entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', first), '+', 'COUNT', count)
  end
end
return {epoch, offset, entries, recovered}
