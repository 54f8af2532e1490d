-- A delivery attempt's end. 'retry': the row (attempts, last error) is kept, due at next ms.
-- 'done': the row leaves the outbox and goes to the log of recent deliveries (trimmed).
-- Nothing happens for a row no longer in the outbox (another replica finished it).
-- KEYS: outbox hash, due zset, log list
-- ARGV: mode, id, row, next ms (retry) or log length (done)
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
  return 0
end
if ARGV[1] == 'retry' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
end
return 1
