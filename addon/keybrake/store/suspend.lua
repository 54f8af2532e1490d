-- Suspend a vault key (keeping the first time and reason when suspended again), or resume it.
-- KEYS[1]  key record hash (<prefix>key:<key_id>)
-- ARGV[1]  'suspend' or 'resume'
-- ARGV[2]  suspended_at in epoch microseconds ('suspend' only)
-- ARGV[3]  the reason shown to operators ('suspend' only)
-- Returns the record as HGETALL does, or an empty array when the key is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
if ARGV[1] == 'suspend' then
  if redis.call('HSETNX', KEYS[1], 'suspended_at', ARGV[2]) == 1 then
    redis.call('HSET', KEYS[1], 'suspended_reason', ARGV[3])
  end
else
  redis.call('HDEL', KEYS[1], 'suspended_at', 'suspended_reason')
end
return redis.call('HGETALL', KEYS[1])
