-- Everything one vendor call needs before it is forwarded, in one step (DESIGN §4): the key's
-- state, the request-rate count, the key's object quota, the idempotency claim or replay, and
-- the reservation over every budget with the caps as stored now.
-- KEYS[1]  key record hash            (<prefix>key:<key_id>)
-- KEYS[2]  the key's request counts   (<prefix>rate:<key_id>), bucket index -> count
-- KEYS[3]  the key's objects          (<prefix>objs:<key_id>), sorted set by expiry (ms)
-- KEYS[4]  idempotency hash           (<prefix>idem:<key_id>:<scope>)
-- KEYS[5]  the key's idempotency index (<prefix>idem-index:<key_id>)
-- KEYS[6]  reservation hash           (<prefix>res:<reservation_id>)
-- KEYS[7]  open reservations          (<prefix>open-reservations)
-- KEYS[8]  label budgets hash         (<prefix>label-budgets)
-- KEYS[9…] usage hashes: key day, key lifetime, label day (only with a label)
-- ARGV[1]  now, epoch µs (the caller's clock: expiry, the reservation's time)
-- ARGV[2]  request-rate limit, or '' for none
-- ARGV[3]  the current 5-second bucket, ARGV[4] buckets counted, ARGV[5] rate TTL ms
-- ARGV[6]  object quota, or '' when the call creates nothing
-- ARGV[7]  body sha256 of an idempotency claim, or '' for none; ARGV[8] its TTL s,
--          ARGV[9] seconds after which an in-flight claim is stale, ARGV[10] max entries
-- ARGV[11] reservation id, or '' for a free call; ARGV[12] estimate µs
-- ARGV[13] TTL s of daily usage hashes; ARGV[14] the UTC day; ARGV[15] key id
-- Returns {status, code, detail, extra, key fields (HGETALL, flattened, as a nested table),
--          label_cap, usage (spent, reserved, …) | replay status, headers, body}.
--   status 'admitted' | 'replay' | 'refused'; extra: live rate buckets (flattened) for
--   rate_limited, the index of the exceeded usage hash for cap_exhausted.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {'refused', 'vault_key_unknown', '', {}, {}}
end
local key = {}
for i = 1, #fields, 2 do key[fields[i]] = fields[i + 1] end
if key['revoked_at'] then
  return {'refused', 'vault_key_revoked', '', {}, fields}
end
if tonumber(ARGV[1]) >= tonumber(key['expires_at']) then
  return {'refused', 'vault_key_expired', '', {}, fields}
end
if key['suspended_at'] then
  return {'refused', 'key_suspended', '', {}, fields}
end

if ARGV[2] ~= '' then
  local oldest = tonumber(ARGV[3]) - tonumber(ARGV[4]) + 1
  local flat = redis.call('HGETALL', KEYS[2])
  local total, live = 0, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < oldest then
      redis.call('HDEL', KEYS[2], flat[i])
    else
      total = total + tonumber(flat[i + 1])
      live[#live + 1] = flat[i]
      live[#live + 1] = flat[i + 1]
    end
  end
  if total + 1 > tonumber(ARGV[2]) then
    return {'refused', 'rate_limited', '', live, fields}
  end
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[6] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
    return {'refused', 'quota_exceeded', 'objects', {}, fields}
  end
end

local claim = false
if ARGV[7] ~= '' then
  local row = redis.call('HMGET', KEYS[4], 'state', 'body_sha256', 'started_ms',
                         'status', 'headers', 'body')
  local state = row[1]
  if state == 'in_flight' and now_ms - tonumber(row[3]) > tonumber(ARGV[9]) * 1000 then
    state = false
  end
  if state then
    if row[2] ~= ARGV[7] then
      return {'refused', 'idempotency_mismatch', 'idempotency', {}, fields}
    end
    if state == 'in_flight' then
      return {'refused', 'idempotency_in_flight', 'idempotency', {}, fields}
    end
    return {'replay', '', '', {}, fields, row[4], row[5], row[6]}
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms)
  if not row[1] and redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[10]) then
    return {'refused', 'quota_exceeded', 'idempotency', {}, fields}
  end
  claim = true
end

local label_cap = ''
local usage = {}
local n = #KEYS - 8
if ARGV[11] ~= '' then
  if key['agent_run_label'] ~= '' then
    label_cap = redis.call('HGET', KEYS[8], key['agent_run_label']) or ''
  end
  local caps = {key['daily_cap_micros'], key['usd_cap_micros'] or '', label_cap}
  local estimate = tonumber(ARGV[12])
  for i = 1, n do
    local u = redis.call('HMGET', KEYS[8 + i], 'spent', 'reserved')
    usage[i] = {tonumber(u[1] or '0'), tonumber(u[2] or '0')}
  end
  if redis.call('EXISTS', KEYS[6]) == 0 then
    for i = 1, n do
      if caps[i] ~= '' and usage[i][1] + usage[i][2] + estimate > tonumber(caps[i]) then
        local reply = {'refused', 'cap_exhausted', '', {i}, fields, label_cap}
        for j = 1, n do
          table.insert(reply, usage[j][1])
          table.insert(reply, usage[j][2])
        end
        return reply
      end
    end
    local res = {'state', 'reserved', 'key_id', ARGV[15], 'estimate', ARGV[12],
                 'created_at', ARGV[1], 'day', ARGV[14]}
    for i = 1, n do
      usage[i][2] = redis.call('HINCRBY', KEYS[8 + i], 'reserved', ARGV[12])
      if i ~= 2 then
        redis.call('EXPIRE', KEYS[8 + i], ARGV[13])
      end
      table.insert(res, 'usage_' .. i)
      table.insert(res, KEYS[8 + i])
    end
    redis.call('HSET', KEYS[6], unpack(res))
    redis.call('ZADD', KEYS[7], ARGV[1], ARGV[11])
  end
end

if claim then
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[4], 'state', 'in_flight', 'body_sha256', ARGV[7],
             'started_ms', string.format('%d', now_ms))
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  local expires = string.format('%d', now_ms + tonumber(ARGV[8]) * 1000)
  redis.call('ZADD', KEYS[5], expires, KEYS[4])
  redis.call('PEXPIREAT', KEYS[5], expires, 'GT')
  if redis.call('PTTL', KEYS[5]) < 0 then
    redis.call('PEXPIREAT', KEYS[5], expires)
  end
end

local reply = {'admitted', '', '', {}, fields, label_cap}
for i = 1, #usage do
  table.insert(reply, usage[i][1])
  table.insert(reply, usage[i][2])
end
return reply
