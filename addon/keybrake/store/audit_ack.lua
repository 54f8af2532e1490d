-- Drop audit rows a sink has committed from the outbox stream, in one step: afterwards the
-- stream holds no acknowledged row (its length is the backlog).
-- KEYS[1]  the audit stream (<prefix>audit, or <prefix>{<tag>}audit on a cluster)
-- ARGV[1]  the consumer group; ARGV[2] the newest of the rows given; ARGV[3] the id just
--          after it (its sequence number plus one); ARGV[4…] the rows' entry ids
-- When every row given was pending in the group (claimed by audit_read.lua, the pumps' way)
-- and no older row is still pending, the rows are acknowledged and the stream is trimmed from
-- its head (XTRIM MINID: whole nodes at a time, not entry by entry) up to the oldest row
-- still pending, or, with none pending, to ARGV[3]. A row older than one the group delivered
-- was delivered too (delivery follows the ids), and every acknowledged row left the stream
-- when it was acknowledged, so only the rows given go. Otherwise (an older row is still
-- another replica's; rows read with XRANGE and never claimed: `drain_outbox`; a Redis user
-- without XPENDING or XTRIM, the README's ACL before they were added), the rows are deleted
-- one by one (XDEL), as before.
-- Returns the rows left in the stream.

-- Whether stream id a is older than b ('<ms>-<seq>').
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and tonumber(as) < tonumber(bs))
end

local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4))
local trimmed = false
if acked == #ARGV - 3 then
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
  if not pending.err and (not pending[2] or older(ARGV[2], pending[2])) then
    local reply = redis.pcall('XTRIM', KEYS[1], 'MINID', pending[2] or ARGV[3])
    trimmed = type(reply) == 'number'
  end
end
if not trimmed then
  redis.call('XDEL', KEYS[1], unpack(ARGV, 4))
end
return redis.call('XLEN', KEYS[1])
