-- Count one request of a vault key unless the last minute (13 five-second buckets) is full.
-- KEYS[1]  the key's request counts (<prefix>rate:<key_id>), hash: bucket index → count (and
--          the total, see _rate.lua)
-- ARGV[1]  limit: requests in any 60 seconds
-- ARGV[2]  the current bucket index (5-second buckets since the epoch)
-- ARGV[3]  how many buckets count: the current one and those just before it
-- ARGV[4]  how long the hash is kept after a write, in milliseconds
-- Returns {1} when counted, or {0, bucket, count, bucket, count, …} (the buckets that still
-- count, for the caller's Retry-After) when one more request would exceed the limit.
--#include _rate
local current = tonumber(ARGV[2])
local oldest = current - tonumber(ARGV[3]) + 1
if rate_total(KEYS[1], oldest, current, ARGV[4]) + 1 > tonumber(ARGV[1]) then
  return {0, unpack(rate_live(KEYS[1], oldest))}
end
rate_count(KEYS[1], ARGV[2], ARGV[4])
return {1}
