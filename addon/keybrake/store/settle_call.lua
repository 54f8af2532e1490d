-- Everything an answered vendor call changes, in one step, its audit row included (DESIGN §4).
-- KEYS[1]  reservation hash (<prefix>res:<reservation_id>), or any key when ARGV[1] is ''
-- KEYS[2]  open reservations (<prefix>open-reservations)
-- KEYS[3]  the object's hold set (<prefix>hold:<vendor>:<object_id>) for 'held'
-- KEYS[4]  the key's objects (<prefix>objs:<key_id>)
-- KEYS[5]  the remembered amount (<prefix>amount:<key_id>:<vendor>:<object_id>)
-- KEYS[6]  idempotency hash, KEYS[7] the key's idempotency index
-- KEYS[8]  the audit stream (<prefix>audit)
-- KEYS[9 … 8+ARGV[18]] the reservation's usage hashes (key day, key lifetime, label day)
-- KEYS[9+ARGV[18] …]  object hashes (<prefix>obj:<vendor>:<object_id>) of created objects
-- ARGV[1]  '', 'settled', 'released', 'unknown' or 'held'; ARGV[2] actual µs (settled);
--          ARGV[3] amount held µs (held); ARGV[4] reservation id
-- ARGV[5]  TTL s of daily usage hashes; ARGV[6] TTL s of a finished reservation hash
-- ARGV[7]  key id; ARGV[8] label; ARGV[9] TTL s of object records
-- ARGV[10] amount to remember µs, or ''; ARGV[11] its TTL s
-- ARGV[12] '' (no idempotency claim), 'complete' or 'abandon'; ARGV[13] TTL s of the
--          stored response; ARGV[14] status, ARGV[15] headers JSON, ARGV[16] body
-- ARGV[17] the audit row (JSON), or ''; ARGV[18] how many usage hashes follow KEYS[8]
-- ARGV[19] finished_at, epoch ms (informational)
-- Returns 1 when the reservation was finished now, else 0 (the rest is applied all the same).
local n = tonumber(ARGV[18])
local finished = 0
if ARGV[1] ~= '' then
  local row = redis.call('HMGET', KEYS[1], 'state', 'estimate')
  if row[1] == 'reserved' then
    for i = 1, n do
      if redis.call('HGET', KEYS[1], 'usage_' .. i) ~= KEYS[8 + i] then
        return redis.error_reply('settle_call.lua: usage keys do not match the reservation')
      end
    end
    local estimate = row[2]
    if ARGV[1] == 'held' then
      local delta = tonumber(ARGV[3]) - tonumber(estimate)
      for i = 1, n do
        if delta ~= 0 and redis.call('HINCRBY', KEYS[8 + i], 'reserved',
                                     string.format('%d', delta)) < 0 then
          redis.call('HSET', KEYS[8 + i], 'reserved', '0')
        end
      end
      redis.call('HSET', KEYS[1], 'estimate', ARGV[3], 'hold', KEYS[3])
      redis.call('SADD', KEYS[3], ARGV[4])
      redis.call('ZREM', KEYS[2], ARGV[4])
    else
      local spent = estimate
      if ARGV[1] == 'settled' then
        spent = ARGV[2]
      elseif ARGV[1] == 'released' then
        spent = '0'
      end
      for i = 1, n do
        if estimate ~= '0' and redis.call('HINCRBY', KEYS[8 + i], 'reserved',
                                          '-' .. estimate) < 0 then
          redis.call('HSET', KEYS[8 + i], 'reserved', '0')
        end
        redis.call('HINCRBY', KEYS[8 + i], 'spent', spent)
        if i ~= 2 then
          redis.call('EXPIRE', KEYS[8 + i], ARGV[5])
        end
      end
      redis.call('HSET', KEYS[1], 'state', ARGV[1], 'actual', spent, 'finished_at', ARGV[19])
      redis.call('EXPIRE', KEYS[1], ARGV[6])
      redis.call('ZREM', KEYS[2], ARGV[4])
    end
    finished = 1
  end
end

if #KEYS > 8 + n then
  local t = redis.call('TIME')
  local expires = string.format('%d', tonumber(t[1]) * 1000
    + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[9]) * 1000)
  for i = 9 + n, #KEYS do
    local owner = redis.call('HGET', KEYS[i], 'key')
    if not owner then
      redis.call('HSET', KEYS[i], 'key', ARGV[7], 'label', ARGV[8])
      owner = ARGV[7]
    end
    if owner == ARGV[7] then
      redis.call('EXPIRE', KEYS[i], ARGV[9])
      redis.call('ZADD', KEYS[4], expires, KEYS[i])
    end
  end
  redis.call('PEXPIREAT', KEYS[4], expires)
end

if ARGV[10] ~= '' then
  redis.call('SET', KEYS[5], ARGV[10], 'EX', ARGV[11])
end

if ARGV[12] ~= '' and redis.call('HGET', KEYS[6], 'state') == 'in_flight' then
  if ARGV[12] == 'abandon' then
    redis.call('DEL', KEYS[6])
    redis.call('ZREM', KEYS[7], KEYS[6])
  else
    redis.call('HSET', KEYS[6], 'state', 'done', 'status', ARGV[14], 'headers', ARGV[15],
               'body', ARGV[16])
    redis.call('EXPIRE', KEYS[6], ARGV[13])
    local t = redis.call('TIME')
    local expires = string.format('%d', tonumber(t[1]) * 1000
      + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[13]) * 1000)
    redis.call('ZADD', KEYS[7], expires, KEYS[6])
    redis.call('PEXPIREAT', KEYS[7], expires, 'GT')
  end
end

if ARGV[17] ~= '' then
  redis.call('XADD', KEYS[8], '*', 'row', ARGV[17])
end
return finished
