-- Claim one vendor object for a vault key on a Redis Cluster, where an object's owner record
-- is in its own slot (any key may ask who owns it) and so cannot be written by the script that
-- settles the call; the first owner stays.
-- KEYS[1]  the owner record (<prefix>owner:<vendor>:<object_id>), a string
--          '<key id>\n\n<label>' (see record_objects.lua)
-- ARGV[1]  key id
-- ARGV[2]  the key's label
-- ARGV[3]  TTL in seconds of the record
-- Returns 1 when the object is the key's (new or renewed), 0 when another key owns it.
local prefix = ARGV[1] .. '\n'
if redis.call('SET', KEYS[1], prefix .. '\n' .. ARGV[2], 'NX', 'EX', ARGV[3]) then
  return 1
end
local owner = redis.call('GET', KEYS[1])
if owner and string.sub(owner, 1, #prefix) == prefix then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
