-- Count one request of a vault key unless its sliding minute is full.
-- KEYS[1]  this minute's counter   (<prefix>rate:<key_id>:<minute index>)
-- KEYS[2]  previous minute's counter (<prefix>rate:<key_id>:<minute index - 1>)
-- ARGV[1]  limit: requests in any 60 seconds
-- ARGV[2]  milliseconds elapsed in this minute
-- ARGV[3]  minute length in milliseconds
-- Returns {1, current, previous} when counted (current before counting),
--         {0, current, previous} when full (nothing changed).
local limit = tonumber(ARGV[1])
local elapsed = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
-- The same integer test as keybrake.store._common.rate_admits (exact in doubles below 2^53).
if previous * (window - elapsed) + (current + 1) * window > limit * window then
  return {0, current, previous}
end
redis.call('INCR', KEYS[1])
-- Kept for two minutes: long enough to be the "previous minute" of the next one.
redis.call('PEXPIRE', KEYS[1], 2 * window)
return {1, current, previous}
