-- Keep an open reservation for a vendor object until an answer about the object finishes it.
-- KEYS[1]  reservation hash             (<prefix>res:<reservation_id>)
-- KEYS[2]  open-reservations sorted set (<prefix>open-reservations): a held reservation
--          leaves it, so crash recovery never turns it into 'unknown'
-- KEYS[3]  the object's hold set        (<prefix>hold:<vendor>:<object_id>)
-- KEYS[4…] the usage hashes the reservation recorded (see _reservation.lua), in that order
-- ARGV[1]  the amount held in micro-USD (replaces the reservation's estimate, no cap check:
--          the vendor has accepted the object)
-- ARGV[2]  reservation id
-- Returns 1 when held now, 0 when the reservation is not open (nothing changed).
--#include _reservation
local row = redis.call('HMGET', KEYS[1], 'state', 'estimate', 'usage')
if row[1] ~= 'reserved' then
  return 0
end
if not same_usage(KEYS[1], row[3], 4, #KEYS) then
  return redis.error_reply('hold.lua: usage keys do not match the reservation')
end
local delta = tonumber(ARGV[1]) - tonumber(row[2])
if delta ~= 0 then
  for i = 4, #KEYS do
    if redis.call('HINCRBY', KEYS[i], 'reserved', string.format('%d', delta)) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', '0')
    end
  end
end
redis.call('HSET', KEYS[1], 'estimate', ARGV[1], 'hold', KEYS[3])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
