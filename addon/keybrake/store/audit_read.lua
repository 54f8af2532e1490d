-- Read a batch of audit rows from one outbox stream for one consumer of the group, in one step:
-- the consumer's own unacknowledged rows first (a sink that failed), else rows another consumer
-- left unacknowledged for ARGV[4] ms (a replica that died), else new rows.
-- KEYS[1]  the audit stream (<prefix>audit, or <prefix>{<tag>}audit on a cluster)
-- ARGV[1]  the consumer group; ARGV[2] this consumer; ARGV[3] most rows to read
-- ARGV[4]  how long (ms) a row stays another consumer's before it is claimed
-- Returns {id, row, id, row, ...} (row: the entry's 'row' field). The group is created when the
-- stream was deleted since (FLUSHDB, a prefix cleanup); entries deleted while pending are
-- acknowledged (left pending, they would come back first forever).
local function read(from)
  local got = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                          'STREAMS', KEYS[1], from)
  if type(got) == 'table' and got.err then
    if not string.find(got.err, 'NOGROUP', 1, true) then
      return redis.error_reply(got.err)
    end
    redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
    got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], from)
  end
  if not got then
    return {}
  end
  return got[1][2]
end

local entries = read('0')
if entries.err then
  return entries
end
if #entries == 0 then
  entries = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0',
                       'COUNT', ARGV[3])[2]
end
if #entries == 0 then
  entries = read('>')
end
local out = {}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if not fields then
    redis.call('XACK', KEYS[1], ARGV[1], entry[1])
  else
    for i = 1, #fields, 2 do
      if fields[i] == 'row' then
        table.insert(out, entry[1])
        table.insert(out, fields[i + 1])
      end
    end
  end
end
return out
