-- Claim an idempotency scope of a vault key, or report why it cannot be claimed.
-- KEYS[1]  idempotency hash (<prefix>idem:<key_id>:<scope>): state ('in_flight' | 'done'),
--          body_sha256, started_ms, and once done status, headers (JSON), body
-- KEYS[2]  the key's entries (<prefix>idem-index:<key_id>), sorted set: member KEYS[1],
--          score: when the entry expires, epoch ms (what bounds one key's share of the store)
-- ARGV[1]  sha256 hex digest of the request body
-- ARGV[2]  TTL in seconds of the claim
-- ARGV[3]  seconds after which an in-flight claim is stale and may be taken over
-- ARGV[4]  the most live entries the key may keep
-- Returns {'started'} | {'in_flight'} | {'mismatch'} | {'full'} |
--         {'replay', status, headers, body}.
-- The server clock is used so that every replica agrees on staleness and expiry.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local row = redis.call('HMGET', KEYS[1], 'state', 'body_sha256', 'started_ms',
                       'status', 'headers', 'body')
local state = row[1]
if state == 'in_flight' and now_ms - tonumber(row[3]) > tonumber(ARGV[3]) * 1000 then
  state = false
end
if not state then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  if not row[1] and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    return {'full'}
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'body_sha256', ARGV[1],
             'started_ms', string.format('%d', now_ms))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  local expires = string.format('%d', now_ms + tonumber(ARGV[2]) * 1000)
  redis.call('ZADD', KEYS[2], expires, KEYS[1])
  redis.call('PEXPIREAT', KEYS[2], expires, 'GT')
  if redis.call('PTTL', KEYS[2]) < 0 then
    redis.call('PEXPIREAT', KEYS[2], expires)
  end
  return {'started'}
end
if row[2] ~= ARGV[1] then
  return {'mismatch'}
end
if state == 'in_flight' then
  return {'in_flight'}
end
return {'replay', row[4], row[5], row[6]}
