-- Revoke a vault key, keeping the first revocation time when revoked again.
-- KEYS[1]  key record hash (<prefix>key:<key_id>)
-- ARGV[1]  revoked_at in epoch microseconds
-- Returns the record as HGETALL does, or an empty array when the key is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])
