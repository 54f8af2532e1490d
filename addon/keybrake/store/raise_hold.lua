-- Raise (or lower) an open reservation's amount, checking every budget it was reserved in.
-- KEYS[1]  reservation hash (<prefix>res:<reservation_id>)
-- KEYS[2]  label budgets hash (<prefix>label-budgets)
-- KEYS[3…] the usage hashes the reservation recorded (see _reservation.lua), in that order
--          (every node of the key's budget tree path, in `usage_plan`'s order): checked
--          against the key's caps (ARGV[3], ARGV[4]) and the tree's, read here
-- ARGV[1]  the new amount in micro-USD
-- ARGV[2]  the key's label, or '' when it has none
-- ARGV[3]  the key's daily cap in micro-USD
-- ARGV[4]  the key's lifetime cap in micro-USD, or '' when it has none
-- ARGV[5]  the issuer that minted the key, or '' 
-- Returns {status, exceeded, tree limits, spent_1, reserved_1, …} like reserve.lua: status 1
-- changed, 0 refused (exceeded = index of the first usage hash over its cap), -1 the
-- reservation is not open.
--#include _tree
--#include _reservation
local row = redis.call('HMGET', KEYS[1], 'state', 'estimate', 'usage')
if row[1] ~= 'reserved' then
  return {-1, 0, {}}
end
local n = #KEYS - 2
if not same_usage(KEYS[1], row[3], 3, #KEYS) then
  return redis.error_reply('raise_hold.lua: usage keys do not match the reservation')
end
local tree = tree_limits(KEYS[2], ARGV[2], ARGV[5], {})
local caps = path_caps(tree, ARGV[3], ARGV[4], ARGV[2], ARGV[5])
if #caps ~= n then
  return redis.error_reply('raise_hold.lua: the usage keys do not match the key\'s budget tree')
end
local delta = tonumber(ARGV[1]) - tonumber(row[2])
local usage = {}
for i = 1, n do
  local u = redis.call('HMGET', KEYS[2 + i], 'spent', 'reserved')
  usage[i] = {tonumber(u[1] or '0'), tonumber(u[2] or '0')}
end
local status, exceeded = 1, 0
if delta > 0 then
  for i = 1, n do
    if caps[i] ~= '' and usage[i][1] + usage[i][2] + delta > tonumber(caps[i]) then
      status, exceeded = 0, i
      break
    end
  end
end
if status == 1 and delta ~= 0 then
  for i = 1, n do
    usage[i][2] = redis.call('HINCRBY', KEYS[2 + i], 'reserved', string.format('%d', delta))
    if usage[i][2] < 0 then
      redis.call('HSET', KEYS[2 + i], 'reserved', '0')
      usage[i][2] = 0
    end
  end
  redis.call('HSET', KEYS[1], 'estimate', ARGV[1])
end
local reply = {status, exceeded, tree}
for i = 1, n do
  table.insert(reply, usage[i][1])
  table.insert(reply, usage[i][2])
end
return reply
