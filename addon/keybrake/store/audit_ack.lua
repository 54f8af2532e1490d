-- Drop audit rows a sink has committed from the outbox stream, in one step.
-- KEYS[1]  the audit stream (<prefix>audit, or <prefix>{<tag>}audit on a cluster)
-- ARGV[1]  the consumer group; ARGV[2] the id just after the newest row given (its sequence
--          number plus one); ARGV[3…] the rows' entry ids
-- When every row given was pending in the group (claimed by audit_read.lua, the pumps' way),
-- the rows are acknowledged and the stream is trimmed from its head (XTRIM MINID: whole nodes
-- at a time, not entry by entry) up to the oldest row still pending, or, with none pending, up
-- to ARGV[2]. A row older than one the group delivered was delivered too (delivery follows
-- the ids), so whatever goes was acknowledged. Otherwise (rows read with XRANGE and never
-- claimed: `drain_outbox`), or for a Redis user without XPENDING or XTRIM (the README's ACL
-- before they were added), the rows are deleted one by one (XDEL), as before.
-- Returns the rows left in the stream.
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
local trimmed = false
if acked == #ARGV - 2 then
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
  if not pending.err then
    local reply = redis.pcall('XTRIM', KEYS[1], 'MINID', pending[2] or ARGV[2])
    trimmed = type(reply) == 'number'
  end
end
if not trimmed then
  redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
end
return redis.call('XLEN', KEYS[1])
