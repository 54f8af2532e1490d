-- Fire an alert once: SET NX on its dedupe key, and only when that was first, queue one
-- delivery row per webhook (due now). One script on one slot ({alerts} hash tag).
-- KEYS: fired-key, seq, outbox hash, due zset
-- ARGV: ttl seconds (0: never expires), now ms, row...
local ok
if tonumber(ARGV[1]) > 0 then
  ok = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1])
else
  ok = redis.call('SET', KEYS[1], ARGV[2], 'NX')
end
if not ok then
  return 0
end
for i = 3, #ARGV do
  local id = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[3], id, ARGV[i])
  redis.call('ZADD', KEYS[4], ARGV[2], id)
end
return 1
