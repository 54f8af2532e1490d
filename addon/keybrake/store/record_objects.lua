-- Record a vault key as the owner of vendor objects it created; the first owner stays.
-- KEYS[1]  the key's objects (<prefix>objs:<key_id>), sorted set: member an object hash's
--          name, score: when the record expires, epoch ms
-- KEYS[2…] one object hash per object (<prefix>obj:<vendor>:<object_id>): key, label
-- ARGV[1]  key id
-- ARGV[2]  the key's label
-- ARGV[3]  TTL in seconds of a record
-- Returns how many objects were recorded for this key (new or renewed).
local t = redis.call('TIME')
local expires = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  + tonumber(ARGV[3]) * 1000)
local recorded = 0
for i = 2, #KEYS do
  local owner = redis.call('HGET', KEYS[i], 'key')
  if not owner then
    redis.call('HSET', KEYS[i], 'key', ARGV[1], 'label', ARGV[2])
    owner = ARGV[1]
  end
  if owner == ARGV[1] then
    redis.call('EXPIRE', KEYS[i], ARGV[3])
    redis.call('ZADD', KEYS[1], expires, KEYS[i])
    recorded = recorded + 1
  end
end
if recorded > 0 then
  redis.call('PEXPIREAT', KEYS[1], expires)
end
return recorded
