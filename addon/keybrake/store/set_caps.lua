-- Change a vault key's caps; admit.lua reads them from the same hash in its own step.
-- KEYS[1]  key record hash (<prefix>key:<key_id>)
-- ARGV[1]  the new daily cap in µs, or '' to keep it
-- ARGV[2]  the new lifetime cap in µs, '' to keep it, or '-' to remove it
-- Returns the record as HGETALL does, or an empty array when the key is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'daily_cap_micros', ARGV[1])
end
if ARGV[2] == '-' then
  redis.call('HDEL', KEYS[1], 'usd_cap_micros')
elseif ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'usd_cap_micros', ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
