-- Record a vault key as the owner of vendor objects it created; the first owner stays.
-- KEYS[1]  the key's objects (<prefix>objs:<key_id>), sorted set: member an owner record's
--          name, score: when the record expires, epoch ms
-- KEYS[2…] one owner record per object (<prefix>owner:<vendor>:<object_id>), a string:
--          '<key id>\n\n<label>' (see settle_call.lua, which may put an amount between)
-- ARGV[1]  key id
-- ARGV[2]  the key's label
-- ARGV[3]  TTL in seconds of a record
-- Returns how many objects were recorded for this key (new or renewed).
local t = redis.call('TIME')
local expires = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  + tonumber(ARGV[3]) * 1000)
local record = ARGV[1] .. '\n\n' .. ARGV[2]
local recorded = 0
for i = 2, #KEYS do
  local mine = redis.call('SET', KEYS[i], record, 'NX', 'EX', ARGV[3])
  if not mine then
    local owner = redis.call('GET', KEYS[i])
    if owner and string.sub(owner, 1, #ARGV[1] + 1) == ARGV[1] .. '\n' then
      redis.call('EXPIRE', KEYS[i], ARGV[3])
      mine = true
    end
  end
  if mine then
    redis.call('ZADD', KEYS[1], expires, KEYS[i])
    recorded = recorded + 1
  end
end
if recorded > 0 then
  redis.call('PEXPIREAT', KEYS[1], expires)
end
return recorded
