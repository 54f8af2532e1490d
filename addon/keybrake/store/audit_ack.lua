-- Drop audit rows a sink has committed from the outbox stream, in one step: afterwards the
-- stream holds no acknowledged row (its length is the backlog).
-- KEYS[1]  the audit stream (<prefix>audit, or <prefix>{<tag>}audit on a cluster)
-- ARGV[1]  the consumer group; ARGV[2] the newest of the rows given; ARGV[3…] the rows'
--          entry ids
-- When every row given was pending in the group (claimed by audit_read.lua, the pumps' way)
-- and no older row is still pending, the rows are acknowledged and the stream is trimmed from
-- its head (XTRIM MINID: whole nodes at a time, not entry by entry) up to the oldest row
-- still pending, or, with none pending, to just after ARGV[2]. A row older than one the group delivered
-- was delivered too (delivery follows the ids), and every acknowledged row left the stream
-- when it was acknowledged, so only the rows given go. Otherwise (an older row is still
-- another replica's; rows read with XRANGE and never claimed: `drain_outbox`; a Redis user
-- without XPENDING or XTRIM, the README's ACL before they were added), the rows are deleted
-- one by one (XDEL), as before.
-- Returns the rows left in the stream.

-- A stream id ('<ms>-<seq>') as its two numbers.
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
local trimmed = false
if acked == #ARGV - 2 then
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
  if not pending.err then
    local ms, seq = parts(ARGV[2])
    local upto = string.format('%d-%d', ms, seq + 1)  -- just after the newest row given
    if pending[2] then  -- the oldest row still pending
      local pms, pseq = parts(pending[2])
      upto = (ms < pms or (ms == pms and seq < pseq)) and pending[2] or nil
    end
    if upto then
      trimmed = type(redis.pcall('XTRIM', KEYS[1], 'MINID', upto)) == 'number'
    end
  end
end
if not trimmed then
  redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
end
return redis.call('XLEN', KEYS[1])
