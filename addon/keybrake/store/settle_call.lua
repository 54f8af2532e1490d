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
-- KEYS[9 … 8+ARGV[13]] the reservation's usage hashes (every node of its budget tree path,
--          as admit.lua recorded them)
-- KEYS[9+ARGV[13] …]  owner records (<prefix>owner:<vendor>:<object_id>) of created objects:
--          '<key id>\n<remembered µs>:<expires, epoch s>\n<label>' (the amount part empty
--          when none is remembered with the record)
-- ARGV[1]  '', 'settled', 'released', 'unknown' or 'held'; ARGV[2] actual µs (settled);
--          ARGV[3] amount held µs (held); ARGV[4] reservation id
-- ARGV[5]  key id; ARGV[6] label
-- ARGV[7]  '<vendor>:<object_id>' whose amount to remember, or ''; ARGV[8] the amount µs;
--          ARGV[9] index in KEYS of the created object it is about (its owner record carries
--          it, when new), or '0'
-- ARGV[10] the idempotency claim: '' (none), 'abandon', or, to complete it, the claim as
--          admit.lua wrote it up to its body hash ('I<length>:<sha>'); ARGV[11] now, epoch ms
--          (the caller's clock, within the replicas' allowed skew: it dates object records and
--          remembered amounts, which live days); ARGV[12] the completed entry ('D<length>:<sha>'
--          then the response as stored: status, headers, body), kept as long as the claim was
--          (its TTL, set by admit.lua)
-- ARGV[13] how many usage hashes follow KEYS[8]; ARGV[14] the audit row (JSON), or ''
-- ARGV[15] when the key's objects index and remembered amounts expire,
--          epoch ms, or '' when the caller has set it already (it is the same every call:
--          the key's expiry plus the longest TTL of what they index)
-- ARGV[16…] names of owner records of created objects that own.lua claimed for the key (on a
--          Redis Cluster, where they are in their own slots and not in KEYS): indexed only
-- The TTLs (DAILY_USAGE_TTL, OBJECT_TTL, AMOUNT_TTL) are written into the script when it is
-- loaded (the _consts include below).
-- A finished reservation is deleted: its amount is in the usage hashes and its audit row.
-- Returns 1 when the reservation was finished now, else 0 (the rest is applied all the same).
--#include _consts
--#include _reservation
local n = tonumber(ARGV[13])
local finished = 0

local now_ms = tonumber(ARGV[11])

if ARGV[1] ~= '' then
  local row = redis.call('HMGET', KEYS[1], 'state', 'estimate', 'usage')
  if row[1] == 'reserved' then
    if not same_usage(KEYS[1], row[3], 9, 8 + n) then
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
          redis.call('EXPIRE', KEYS[8 + i], DAILY_USAGE_TTL, 'NX')
        end
      end
      redis.call('DEL', KEYS[1])
      redis.call('ZREM', KEYS[2], ARGV[4])
    end
    finished = 1
  end
end

local remembered = ARGV[7] == ''
local amount = ''
if not remembered then
  amount = ARGV[8] .. ':' .. string.format('%d', math.floor(now_ms / 1000) + AMOUNT_TTL)
end
local indexes_expire = ARGV[15]

if #ARGV > 15 then
  local expires = string.format('%d', now_ms + OBJECT_TTL * 1000)
  for i = 16, #ARGV do
    redis.call('ZADD', KEYS[4], expires, ARGV[i])
  end
  if indexes_expire ~= '' then
    redis.call('PEXPIREAT', KEYS[4], indexes_expire)
  end
end

if #KEYS > 8 + n then
  local expires = string.format('%d', now_ms + OBJECT_TTL * 1000)
  local prefix, about = ARGV[5] .. '\n', tonumber(ARGV[9])
  for i = 9 + n, #KEYS do
    -- The first owner stays: an object never changes hands.
    local record
    if i == about then
      record = prefix .. amount .. '\n' .. ARGV[6]
    else
      record = prefix .. '\n' .. ARGV[6]
    end
    local mine = redis.call('SET', KEYS[i], record, 'NX', 'EX', OBJECT_TTL)
    if mine then
      if i == about then
        remembered = true
      end
    else
      local owner = redis.call('GET', KEYS[i])
      if owner and string.sub(owner, 1, #prefix) == prefix then
        redis.call('EXPIRE', KEYS[i], OBJECT_TTL)
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
  redis.call('HSET', KEYS[5], ARGV[7], amount)
  if indexes_expire ~= '' then
    redis.call('PEXPIREAT', KEYS[5], indexes_expire)
  end
end

if ARGV[10] == 'abandon' then
  local entry = redis.call('GET', KEYS[6])
  if entry and string.sub(entry, 1, 1) == 'I' then
    redis.call('DEL', KEYS[6])
    redis.call('ZREM', KEYS[7], KEYS[6])
  end
elseif ARGV[10] ~= '' then
  -- Completed while it is this call's claim (or a takeover's of the same body); anything else
  -- (the entry done meanwhile) is put back. The claim's expiry stays, so the index's score
  -- for it (admit.lua) stays right.
  local before = redis.call('SET', KEYS[6], ARGV[12], 'XX', 'KEEPTTL', 'GET')
  if before and string.sub(before, 1, #ARGV[10]) ~= ARGV[10] then
    redis.call('SET', KEYS[6], before, 'XX', 'KEEPTTL')
  end
end

if ARGV[14] ~= '' then
  redis.call('XADD', KEYS[8], '*', 'row', ARGV[14])
end
return finished
