-- Claim deliveries that are due: each claimed one is pushed lease ms into the future, so
-- another replica does not send it meanwhile (a replica that dies leaves it due again).
-- KEYS: outbox hash, due zset
-- ARGV: now ms, limit, lease ms
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  local row = redis.call('HGET', KEYS[1], id)
  if row then
    redis.call('ZADD', KEYS[2], until_ms, id)
    out[#out + 1] = id
    out[#out + 1] = row
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
