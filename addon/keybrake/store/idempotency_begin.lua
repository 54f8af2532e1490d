-- Claim an idempotency scope of a vault key, or report why it cannot be claimed.
-- KEYS[1]  idempotency entry (<prefix>idm:<key_id>:<scope>), a string: 'I' (in flight) or
--          'D' (done), the length of the body hash, ':', the body hash, then the claim's
--          start (server ms) or the stored response
-- KEYS[2]  the key's entries (<prefix>idem-index:<key_id>), sorted set: member KEYS[1],
--          score: when the entry expires, epoch ms (what bounds one key's share of the store)
-- ARGV[1]  sha256 hex digest of the request body
-- ARGV[2]  TTL in seconds of the claim
-- ARGV[3]  seconds after which an in-flight claim is stale and may be taken over
-- ARGV[4]  the most live entries the key may keep
-- Returns {'started'} | {'in_flight'} | {'mismatch'} | {'full'} | {'replay', response}.
-- The server clock is used so that every replica agrees on staleness and expiry.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry = redis.call('GET', KEYS[1])
local state, sha, rest
if entry then
  local colon = string.find(entry, ':', 2, true)
  local len = tonumber(string.sub(entry, 2, colon - 1))
  state = string.sub(entry, 1, 1)
  sha = string.sub(entry, colon + 1, colon + len)
  rest = string.sub(entry, colon + len + 1)
  if state == 'I' and now_ms - tonumber(rest) > tonumber(ARGV[3]) * 1000 then
    state = nil
  end
end
if not state then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  local count = redis.call('ZCARD', KEYS[2])
  if not entry and count >= tonumber(ARGV[4]) then
    return {'full'}
  end
  local ttl_ms = tonumber(ARGV[2]) * 1000
  redis.call('SET', KEYS[1], 'I' .. #ARGV[1] .. ':' .. ARGV[1] .. string.format('%d', now_ms),
             'PX', ttl_ms)
  local expires = string.format('%d', now_ms + ttl_ms)
  redis.call('ZADD', KEYS[2], expires, KEYS[1])
  if count == 0 then
    redis.call('PEXPIREAT', KEYS[2], expires)
  else
    redis.call('PEXPIREAT', KEYS[2], expires, 'GT')
  end
  return {'started'}
end
if sha ~= ARGV[1] then
  return {'mismatch'}
end
if state == 'I' then
  return {'in_flight'}
end
return {'replay', rest}
