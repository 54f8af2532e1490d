-- Insert a vault key unless its id or its secret hash is already taken.
-- KEYS[1]  key record hash            (<prefix>key:<key_id>)
-- KEYS[2]  secret-hash index string   (<prefix>secret:<secret_sha256>), value: the key id
-- KEYS[3]  keys-by-creation sorted set (<prefix>keys), score: created_at in epoch µs
-- KEYS[4]  keys-by-expiry sorted set (<prefix>keys-expiring), score: expires_at in epoch µs,
--          until the store has forgotten what it kept for the key (`forget_expired_keys`)
-- ARGV[1]  key id
-- ARGV[2]  created_at in epoch microseconds
-- ARGV[3]  expires_at in epoch microseconds
-- ARGV[4…] field, value, field, value, … of the key record hash
-- Returns 1 when inserted, 0 when the key id exists, -1 when the secret hash exists.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return 1
