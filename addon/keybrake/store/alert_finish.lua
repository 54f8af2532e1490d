-- A delivery attempt's end. 'retry': the row (attempts, last error) is kept, due at next ms.
-- 'done': the row leaves the outbox and goes to the log of recent deliveries (a sorted set
-- by finishing order, trimmed to the most recent). Nothing happens for a row no longer in
-- the outbox (another replica finished it).
-- KEYS: outbox hash, due zset, log zset, seq hash
-- ARGV: mode, id, row, next ms (retry) or log length (done)
if not redis.call('HGET', KEYS[1], ARGV[2]) then
  return 0
end
if ARGV[1] == 'retry' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
  local n = redis.call('HINCRBY', KEYS[4], 'log', 1)
  -- The member is unique (the finishing number leads it); the row follows a newline.
  redis.call('ZADD', KEYS[3], n, n .. '\n' .. ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', n - tonumber(ARGV[4]))
end
return 1
