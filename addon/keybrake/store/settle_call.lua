-- Everything an answered vendor call changes, in one step, its audit row included (DESIGN §4).
-- KEYS[1]  reservation hash (<prefix>res:<reservation_id>), or any key when ARGV[1] is ''
-- KEYS[2]  open reservations (<prefix>open-reservations)
-- KEYS[3]  the object's hold set (<prefix>hold:<vendor>:<object_id>) for 'held'
-- KEYS[4]  the key's objects (<prefix>objs:<key_id>)
-- KEYS[5]  the key's remembered amounts (<prefix>amounts:<key_id>), hash
--          '<vendor>:<object_id>' -> '<µs>:<expires, epoch s>'
-- KEYS[6]  idempotency entry (<prefix>idm:<key_id>:<scope>, see admit.lua), KEYS[7] the
--          key's idempotency index (admit.lua indexed the entry with the expiry it keeps, the
--          claim's; an abandoned entry leaves it)
-- KEYS[8]  the audit stream (<prefix>audit)
-- KEYS[9 … 8+ARGV[16]] the reservation's usage hashes (every node of its budget tree path,
--          as admit.lua recorded them)
-- KEYS[9+ARGV[15] …]  owner records (<prefix>owner:<vendor>:<object_id>) of created objects:
--          '<key id>\n<remembered µs>:<expires, epoch s>\n<label>' (the amount part empty
--          when none is remembered with the record)
-- ARGV[1]  '', 'settled', 'released', 'unknown' or 'held'; ARGV[2] actual µs (settled);
--          ARGV[3] amount held µs (held); ARGV[4] reservation id
-- ARGV[5]  TTL s of daily usage hashes (given to one the step had to create again)
-- ARGV[6]  key id; ARGV[7] label; ARGV[8] TTL s of object records
-- ARGV[9]  '<vendor>:<object_id>' whose amount to remember, or ''; ARGV[10] the amount µs,
--          ARGV[11] its TTL s; ARGV[12] index in KEYS of the created object it is about (its
--          owner record carries it, when new), or '0'
-- ARGV[13] '' (no idempotency claim), 'complete' or 'abandon'; ARGV[14] now, epoch ms (the
--          caller's clock, within the replicas' allowed skew: it dates object records and
--          remembered amounts, which live days); ARGV[15] the response as stored (status,
--          headers, body), kept as long as the claim was (its TTL, set by admit.lua)
-- ARGV[16] how many usage hashes follow KEYS[8]; ARGV[17] the audit row (JSON), or ''
-- ARGV[18] when the key's objects index and remembered amounts expire,
--          epoch ms, or '' when the caller has set it already (it is the same every call:
--          the key's expiry plus the longest TTL of what they index)
-- ARGV[19…] names of owner records of created objects that own.lua claimed for the key (on a
--          Redis Cluster, where they are in their own slots and not in KEYS): indexed only
-- A finished reservation is deleted: its amount is in the usage hashes and its audit row.
-- Returns 1 when the reservation was finished now, else 0 (the rest is applied all the same).
local n = tonumber(ARGV[16])
local finished = 0

local now_ms = tonumber(ARGV[14])

if ARGV[1] ~= '' then
  local row = redis.call('HMGET', KEYS[1], 'state', 'estimate', 'usage_1', 'usage_2', 'usage_3',
                         'usage_4', 'usage_5', 'usage_6', 'usage_7')
  if row[1] == 'reserved' then
    -- Every usage hash the reservation recorded, no more and no fewer (at most six).
    for i = 1, n do
      if row[2 + i] ~= KEYS[8 + i] then
        return redis.error_reply('settle_call.lua: usage keys do not match the reservation')
      end
    end
    if n < 7 and row[3 + n] then
      return redis.error_reply('settle_call.lua: usage keys do not match the reservation')
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
      -- Built once, not per usage hash (a conversion costs about as much as a short command).
      local unreserve, first_spend = '-' .. estimate, tonumber(spent)
      for i = 1, n do
        -- The daily hashes got their TTL when admit created them; one that vanished since
        -- (a call older than their TTL) is created again here and gets it again.
        local again = false
        if estimate ~= '0' and redis.call('HINCRBY', KEYS[8 + i], 'reserved', unreserve) < 0 then
          redis.call('HSET', KEYS[8 + i], 'reserved', '0')
          again = true
        end
        if spent ~= '0' and redis.call('HINCRBY', KEYS[8 + i], 'spent', spent) == first_spend then
          again = true
        end
        if again and string.sub(KEYS[8 + i], -9) ~= ':lifetime' then
          redis.call('EXPIRE', KEYS[8 + i], ARGV[5], 'NX')
        end
      end
      redis.call('DEL', KEYS[1])
      redis.call('ZREM', KEYS[2], ARGV[4])
    end
    finished = 1
  end
end

local remembered = ARGV[9] == ''
local amount = ''
if not remembered then
  amount = ARGV[10] .. ':' .. string.format('%d', math.floor(now_ms / 1000) + tonumber(ARGV[11]))
end
local indexes_expire = ARGV[18]

if #ARGV > 18 then
  local expires = string.format('%d', now_ms + tonumber(ARGV[8]) * 1000)
  for i = 19, #ARGV do
    redis.call('ZADD', KEYS[4], expires, ARGV[i])
  end
  if indexes_expire ~= '' then
    redis.call('PEXPIREAT', KEYS[4], indexes_expire)
  end
end

if #KEYS > 8 + n then
  local expires = string.format('%d', now_ms + tonumber(ARGV[8]) * 1000)
  local prefix, about = ARGV[6] .. '\n', tonumber(ARGV[12])
  for i = 9 + n, #KEYS do
    -- The first owner stays: an object never changes hands.
    local record
    if i == about then
      record = prefix .. amount .. '\n' .. ARGV[7]
    else
      record = prefix .. '\n' .. ARGV[7]
    end
    local mine = redis.call('SET', KEYS[i], record, 'NX', 'EX', ARGV[8])
    if mine then
      if i == about then
        remembered = true
      end
    else
      local owner = redis.call('GET', KEYS[i])
      if owner and string.sub(owner, 1, #prefix) == prefix then
        redis.call('EXPIRE', KEYS[i], ARGV[8])
        mine = true
      end
    end
    if mine then
      redis.call('ZADD', KEYS[4], expires, KEYS[i])
    end
  end
  if indexes_expire ~= '' then
    redis.call('PEXPIREAT', KEYS[4], indexes_expire)
  end
end

if not remembered then
  redis.call('HSET', KEYS[5], ARGV[9], amount)
  if indexes_expire ~= '' then
    redis.call('PEXPIREAT', KEYS[5], indexes_expire)
  end
end

if ARGV[13] ~= '' then
  local entry = redis.call('GET', KEYS[6])
  if entry and string.sub(entry, 1, 1) == 'I' then
    if ARGV[13] == 'abandon' then
      redis.call('DEL', KEYS[6])
      redis.call('ZREM', KEYS[7], KEYS[6])
    else
      -- The claim's expiry stays, so the index's score for it (admit.lua) stays right.
      local colon = string.find(entry, ':', 2, true)
      local len = tonumber(string.sub(entry, 2, colon - 1))
      redis.call('SET', KEYS[6], 'D' .. string.sub(entry, 2, colon + len) .. ARGV[15],
                 'KEEPTTL')
    end
  end
end

if ARGV[17] ~= '' then
  redis.call('XADD', KEYS[8], '*', 'row', ARGV[17])
end
return finished
