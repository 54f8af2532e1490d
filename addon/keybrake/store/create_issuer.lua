-- Insert an issuer token unless its id or its token hash is already taken.
-- KEYS[1]  issuer record hash           (<prefix>{iss}issuer:<issuer_id>)
-- KEYS[2]  token-hash index string      (<prefix>{iss}issuer-token:<token_sha256>), value: the id
-- KEYS[3]  issuers-by-creation sorted set (<prefix>{iss}issuers), score: created_at in epoch µs
-- ARGV[1]  issuer id
-- ARGV[2]  created_at in epoch microseconds
-- ARGV[3…] field, value, field, value, … of the issuer record hash
-- Returns 1 when inserted, 0 when the issuer id exists, -1 when the token hash exists.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
