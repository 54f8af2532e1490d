-- Complete or abandon an in-flight idempotency claim; anything else is left alone.
-- KEYS[1]  idempotency hash (<prefix>idem:<key_id>:<scope>)
-- KEYS[2]  the key's entries (<prefix>idem-index:<key_id>), see idempotency_begin.lua
-- ARGV[1]  'complete' (store the response) or 'abandon' (forget the claim)
-- ARGV[2]  TTL in seconds of the stored response ('complete' only)
-- ARGV[3]  response status code ('complete' only)
-- ARGV[4]  response headers as a JSON array of [name, value] pairs ('complete' only)
-- ARGV[5]  response body ('complete' only)
-- Returns 1 when the claim was in flight and changed, else 0.
if redis.call('HGET', KEYS[1], 'state') ~= 'in_flight' then
  return 0
end
if ARGV[1] == 'abandon' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[3], 'headers', ARGV[4],
           'body', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  + tonumber(ARGV[2]) * 1000
redis.call('ZADD', KEYS[2], string.format('%d', expires), KEYS[1])
redis.call('PEXPIREAT', KEYS[2], string.format('%d', expires), 'GT')
return 1
