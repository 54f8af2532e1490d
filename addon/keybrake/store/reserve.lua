-- Check every budget of a key and reserve the estimate in all of them, or change nothing
-- (DESIGN.md §2 step 7: one atomic step, so concurrent replicas never overspend a cap).
-- KEYS[1]  reservation hash                 (<prefix>res:<reservation_id>)
-- KEYS[2]  open-reservations sorted set     (<prefix>open-reservations), score: created_at µs
-- KEYS[3]  label budgets hash               (<prefix>label-budgets), field: label, value: cap
-- KEYS[4…] usage hashes of every node of the key's budget tree path, in `usage_plan`'s order
--          (key day, key lifetime, label day and lifetime, issuer day and lifetime)
-- ARGV[1]  estimate in micro-USD (decimal string, >= 0)
-- ARGV[2]  the key's daily cap in micro-USD
-- ARGV[3]  the key's lifetime cap in micro-USD, or '' when it has none
-- ARGV[4]  the key's label, or '' when it has none
-- ARGV[5]  created_at of the reservation in epoch microseconds (the caller's `now`)
-- ARGV[6]  TTL in seconds of the daily usage hashes (the lifetime hash never expires)
-- ARGV[7]  reservation id
-- ARGV[8]  key id
-- ARGV[9]  the issuer that minted the key, or '' 
-- Usage hashes have the fields `spent` and `reserved`; lifetime and label usage is tracked
-- even without a cap so a cap set later already counts what was spent.
-- Returns {status, exceeded, tree limits (6, see _tree.lua), spent_1, reserved_1, …}:
--   status 1 reserved, 0 refused (exceeded = index of the first usage hash over its cap,
--   1 for KEYS[4]), 2 the reservation id exists already (nothing changed);
--   the limits are read in this step; the usage is after the step.
--#include _tree
local estimate = tonumber(ARGV[1])
local n = #KEYS - 3
local tree = tree_limits(KEYS[3], ARGV[4], ARGV[9], {})
local caps = path_caps(tree, ARGV[2], ARGV[3], ARGV[4], ARGV[9])
if #caps ~= n then
  return redis.error_reply('reserve.lua: the usage keys do not match the key\'s budget tree')
end
local usage = {}
for i = 1, n do
  local row = redis.call('HMGET', KEYS[3 + i], 'spent', 'reserved')
  usage[i] = {tonumber(row[1] or '0'), tonumber(row[2] or '0')}
end

local status = 1
local exceeded = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  status = 2
else
  for i = 1, n do
    if caps[i] ~= '' and usage[i][1] + usage[i][2] + estimate > tonumber(caps[i]) then
      status = 0
      exceeded = i
      break
    end
  end
end

if status == 1 then
  for i = 1, n do
    usage[i][2] = redis.call('HINCRBY', KEYS[3 + i], 'reserved', ARGV[1])
    if is_daily(KEYS[3 + i]) then
      redis.call('EXPIRE', KEYS[3 + i], ARGV[6])
    end
  end
  -- The usage hashes are recorded so finishing touches exactly the same ones (see
  -- _reservation.lua).
  redis.call('HSET', KEYS[1], 'state', 'reserved', 'key_id', ARGV[8], 'estimate', ARGV[1],
             'created_at', ARGV[5], 'usage', table.concat(KEYS, '\n', 4, 3 + n))
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[7])
end

local reply = {status, exceeded, tree}
for i = 1, n do
  table.insert(reply, usage[i][1])
  table.insert(reply, usage[i][2])
end
return reply
