-- Complete or abandon an in-flight idempotency claim; anything else is left alone.
-- KEYS[1]  idempotency entry (<prefix>idm:<key_id>:<scope>), see idempotency_begin.lua
-- KEYS[2]  the key's entries (<prefix>idem-index:<key_id>), see idempotency_begin.lua
-- ARGV[1]  'complete' (store the response) or 'abandon' (forget the claim)
-- ARGV[2]  TTL in seconds of the stored response ('complete' only)
-- ARGV[3]  the response as stored: status, headers and body ('complete' only)
-- Returns 1 when the claim was in flight and changed, else 0.
local entry = redis.call('GET', KEYS[1])
if not entry or string.sub(entry, 1, 1) ~= 'I' then
  return 0
end
if ARGV[1] == 'abandon' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 1
end
local colon = string.find(entry, ':', 2, true)
local len = tonumber(string.sub(entry, 2, colon - 1))
local ttl_ms = tonumber(ARGV[2]) * 1000
redis.call('SET', KEYS[1], 'D' .. string.sub(entry, 2, colon + len) .. ARGV[3], 'PX', ttl_ms)
local t = redis.call('TIME')
local expires = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  + ttl_ms)
redis.call('ZADD', KEYS[2], expires, KEYS[1])
redis.call('PEXPIREAT', KEYS[2], expires, 'GT')
return 1
