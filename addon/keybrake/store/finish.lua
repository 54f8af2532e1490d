-- Finish an open reservation exactly once: settle, release or mark unknown.
-- KEYS[1]  reservation hash             (<prefix>res:<reservation_id>)
-- KEYS[2]  open-reservations sorted set (<prefix>open-reservations)
-- KEYS[3]  the hold set of the object the reservation is held for (<prefix>hold:<vendor>:<id>),
--          or KEYS[1] again when it is not held
-- KEYS[4…] the usage hashes the reservation recorded (see _reservation.lua), in that order
--          (every node of the key's budget tree path); all but the '…:lifetime' ones are
--          daily and get ARGV[4]
-- ARGV[1]  the final state: 'settled', 'released' or 'unknown'
-- ARGV[2]  the actual cost in micro-USD for 'settled' (ignored otherwise)
-- ARGV[3]  finished_at in epoch milliseconds (unused; kept for the caller's signature)
-- ARGV[4]  TTL in seconds of the daily usage hashes
-- ARGV[5]  unused (a finished reservation hash is deleted)
-- ARGV[6]  reservation id (the member of KEYS[2] and KEYS[3])
-- Returns 1 when finished now, 0 when the reservation is unknown or already finished
-- (nothing changed: a reservation is never counted twice), -1 when KEYS[3] is not the
-- reservation's hold set (it was held after the caller looked: read again and retry).
--#include _reservation
local row = redis.call('HMGET', KEYS[1], 'state', 'estimate', 'hold', 'usage')
if row[1] ~= 'reserved' then
  return 0
end
if (row[3] or KEYS[1]) ~= KEYS[3] then
  return -1
end
-- Every usage hash the reservation recorded, no more and no fewer.
if not same_usage(KEYS[1], row[4], 4, #KEYS) then
  return redis.error_reply('finish.lua: usage keys do not match the reservation')
end

local estimate = row[2]
local spent = estimate
if ARGV[1] == 'settled' then
  spent = ARGV[2]
elseif ARGV[1] == 'released' then
  spent = '0'
end

for i = 4, #KEYS do
  -- Amounts stay decimal strings: a Lua number would be formatted as a float.
  if estimate ~= '0' then
    if redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. estimate) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', '0')
    end
  end
  redis.call('HINCRBY', KEYS[i], 'spent', spent)
  if string.sub(KEYS[i], -9) ~= ':lifetime' then
    redis.call('EXPIRE', KEYS[i], ARGV[4])
  end
end
-- Finished: its amount is in the usage hashes (and the audit row); nothing else needs it.
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[6])
if row[3] then
  redis.call('SREM', KEYS[3], ARGV[6])
end
return 1
