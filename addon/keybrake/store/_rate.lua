-- Shared by admit.lua and count_request.lua (RedisStore inserts it where a script says
-- '--#include _rate'): a request-rate hash of 5-second buckets, bucket index -> count, plus
-- 't', the sum of the bucket counts the hash holds, and 'o', a bucket no later than any it
-- holds. While 'o' still counts, so does every bucket and 't' is the total: one HMGET, no
-- summing. Once 'o' is too old (every 5 s at most), or the fields are missing (a hash from
-- before they were kept), the buckets are read, the stale ones dropped and 't' and 'o' set.

-- The requests the hash counts from bucket `oldest` on (numbers; `current` the bucket now).
-- Setting 't' and 'o' gives the hash its TTL: a refused call counts nothing.
local function rate_total(hash, oldest, current, ttl_ms)
  local got = redis.call('HMGET', hash, 't', 'o')
  if got[1] and got[2] and tonumber(got[2]) >= oldest then
    return tonumber(got[1])
  end
  local flat = redis.call('HGETALL', hash)
  local total, stale, first = 0, {}, current
  for i = 1, #flat, 2 do
    local bucket = tonumber(flat[i])
    if bucket then
      if bucket < oldest then
        stale[#stale + 1] = flat[i]
      else
        total = total + tonumber(flat[i + 1])
        if bucket < first then
          first = bucket
        end
      end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', hash, unpack(stale))
  end
  redis.call('HSET', hash, 't', total, 'o', first)
  redis.call('PEXPIRE', hash, ttl_ms)
  return total
end

-- The buckets that still count, flattened {bucket, count, …}: for a refusal's Retry-After.
local function rate_live(hash, oldest)
  local flat = redis.call('HGETALL', hash)
  local live = {}
  for i = 1, #flat, 2 do
    local bucket = tonumber(flat[i])
    if bucket and bucket >= oldest then
      live[#live + 1] = flat[i]
      live[#live + 1] = flat[i + 1]
    end
  end
  return live
end

-- Count one request in bucket `current` (a string); a new bucket sets the hash's TTL, which
-- outlives every bucket that still counts.
local function rate_count(hash, current, ttl_ms)
  redis.call('HINCRBY', hash, 't', 1)
  if redis.call('HINCRBY', hash, current, 1) == 1 then
    redis.call('PEXPIRE', hash, ttl_ms)
  end
end
