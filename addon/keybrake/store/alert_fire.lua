-- Fire an alert once: unless its dedupe key holds a window end still to come (or 0: never
-- ends), record the end and queue one delivery row per webhook (due now). The end is judged
-- by the caller's clock ("now"), like every window of the store; the key's TTL is only a
-- backstop that drops it a day after. One script on one slot ({alerts} hash tag), with only
-- commands of the README's ACL line.
-- KEYS: fired-key, seq hash, outbox hash, due zset
-- ARGV: window end ms (0: never), now ms, backstop TTL seconds (0: none), row...
local seen = redis.call('GET', KEYS[1])
if seen and (seen == '0' or tonumber(seen) > tonumber(ARGV[2])) then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
for i = 4, #ARGV do
  local id = redis.call('HINCRBY', KEYS[2], 'outbox', 1)
  redis.call('HSET', KEYS[3], id, ARGV[i])
  redis.call('ZADD', KEYS[4], ARGV[2], id)
end
return 1
