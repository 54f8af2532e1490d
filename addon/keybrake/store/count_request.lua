-- Count one request of a vault key unless the last minute (13 five-second buckets) is full.
-- KEYS[1]  the key's request counts (<prefix>rate:<key_id>), hash: bucket index → count
-- ARGV[1]  limit: requests in any 60 seconds
-- ARGV[2]  the current bucket index (5-second buckets since the epoch)
-- ARGV[3]  how many buckets count: the current one and those just before it
-- ARGV[4]  how long the hash is kept after a write, in milliseconds
-- Returns {1} when counted, or {0, bucket, count, bucket, count, …} (the buckets that still
-- count, for the caller's Retry-After) when one more request would exceed the limit.
local limit = tonumber(ARGV[1])
local oldest = tonumber(ARGV[2]) - tonumber(ARGV[3]) + 1
local flat = redis.call('HGETALL', KEYS[1])
local total = 0
local live = {}
for i = 1, #flat, 2 do
  if tonumber(flat[i]) < oldest then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    total = total + tonumber(flat[i + 1])
    live[#live + 1] = flat[i]
    live[#live + 1] = flat[i + 1]
  end
end
if total + 1 > limit then
  return {0, unpack(live)}
end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1}
