-- eva-ws presence: drop the entries of dead instances, then answer.
-- KEYS[1] entries hash, KEYS[2] counts hash.
-- ARGV[1] 'count' (the live total) or 'list' (every live entry, flat).
-- ARGV[2] heartbeat key prefix for the script to check each instance itself (one Redis),
--         or '' when the caller did (Redis Cluster: heartbeats live in other slots).
-- ARGV[3..] instances the caller found dead.
local dead, any_dead = {}, false
for i = 3, #ARGV do
  dead[ARGV[i]] = true
  any_dead = true
end
local counts = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #counts, 2 do
  local instance = counts[i]
  if not dead[instance] and ARGV[2] ~= '' and redis.call('EXISTS', ARGV[2] .. instance) == 0 then
    dead[instance] = true
    any_dead = true
  end
  if not dead[instance] then
    total = total + tonumber(counts[i + 1])
  end
end
if any_dead then
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    local ok, entry = pcall(cjson.decode, flat[i + 1])
    if ok and type(entry) == 'table' and dead[entry['instance']] then
      redis.call('HDEL', KEYS[1], flat[i])
    end
  end
  for instance in pairs(dead) do
    redis.call('HDEL', KEYS[2], instance)
  end
end
if ARGV[1] == 'count' then
  return total
end
return redis.call('HGETALL', KEYS[1])
