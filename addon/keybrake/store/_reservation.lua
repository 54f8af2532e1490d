-- Shared by the scripts that finish, hold or change a reservation (RedisStore inserts it where
-- a script says '--#include _reservation'). A reservation records the usage hashes it reserved
-- in, so that whatever finishes it touches exactly those: their names joined by '\n' in one
-- field, 'usage' (one value to write and read on every vendor call), or, in a record written
-- before that field was kept, one field each, 'usage_1', 'usage_2', ….

-- Whether KEYS[first … last] are the reservation's usage hashes, no more and no fewer.
-- `packed` is the record's 'usage' field as read with its other fields (false when it has
-- none).
local function same_usage(res, packed, first, last)
  if packed then
    return packed == table.concat(KEYS, '\n', first, last)
  end
  for i = first, last + 1 do
    if (redis.call('HGET', res, 'usage_' .. (i - first + 1)) or nil) ~= KEYS[i] then
      return false
    end
  end
  return true
end
