-- Everything one vendor call needs before it is forwarded, in one step (DESIGN §4): the key's
-- state, the request-rate count, the key's object quota, the idempotency claim or replay, and
-- the reservation over every budget with the caps as stored now.
-- KEYS[1]  key record hash            (<prefix>key:<key_id>)
-- KEYS[2]  the key's request counts   (<prefix>rate:<key_id>), bucket index -> count
-- KEYS[3]  the key's objects          (<prefix>objs:<key_id>), sorted set by expiry (ms)
-- KEYS[4]  idempotency entry          (<prefix>idm:<key_id>:<scope>), a string, see below
-- KEYS[5]  the key's idempotency index (<prefix>idem-index:<key_id>)
-- KEYS[6]  reservation hash           (<prefix>res:<reservation_id>)
-- KEYS[7]  open reservations          (<prefix>open-reservations)
-- KEYS[8]  label budgets hash         (<prefix>label-budgets): label -> daily cap, and
--          '!frozen:<vendor>' -> reason while that vendor is frozen (written into the label
--          budgets hash of every budget tree, so the check needs no key of its own)
-- KEYS[9]  the label's request counts (<prefix>rate:label:<label>), KEYS[10] the issuer's
--          (<prefix>rate:issuer:<issuer_id>): any key when the key has none
-- KEYS[11…] usage hashes of every node on the key's path of the budget tree: key day, key
--          lifetime, label day, label lifetime (only with a label), issuer day, issuer
--          lifetime (only for a key an issuer minted)
-- ARGV[1]  now, epoch µs (the caller's clock: expiry, the reservation's time)
-- ARGV[2]  request-rate limit, or '' for none
-- ARGV[3]  the current 5-second bucket, ARGV[4] buckets counted, ARGV[5] rate TTL ms
-- ARGV[6]  object quota, or '' when the call creates nothing
-- ARGV[7]  body sha256 of an idempotency claim, or '' for none; ARGV[8] its TTL s (at most
--          until the key expires),
--          ARGV[9] seconds after which an in-flight claim is stale, ARGV[10] max entries
-- ARGV[11] reservation id, or '' for a free call; ARGV[12] estimate µs
-- ARGV[13] TTL s of daily usage hashes; ARGV[14] the UTC day; ARGV[15] key id
-- ARGV[16] '1': answer every field of the key record (HGETALL); '': only the fields that can
--          change (the caller keeps the rest, which never changes, from an earlier answer)
-- ARGV[17] '1': give the idempotency index its TTL (the key's expiry + twice the entry TTL:
--          no entry outlives it), '' when the caller has done so already
-- ARGV[18] the key's label, ARGV[19] the issuer that minted it ('' for none; both never change)
-- ARGV[20…] per usage hash, '1': give a daily one its TTL if it has none (EXPIRE NX), ''
--          when the caller has done so already (their names carry the day: a TTL set once
--          is the right one)
-- An idempotency entry is one string: 'I' or 'D' (in flight, done), the length of the body
-- hash, ':', the body hash, then the claim's start (server ms) or the stored response.
-- Only what a step needs is read or written: a TTL is set once (ARGV[17…]), expired index
-- entries are pruned only when a quota is reached, and the server clock is read at most once.
-- Returns {status, code, detail, extra, key fields (flattened, as a nested table),
--          tree limits (6, see _tree.lua), usage (spent, reserved, …) | replay's stored
--          response}.
--   status 'admitted' | 'replay' | 'refused'; extra: live rate buckets (flattened) for
--   rate_limited (detail: the node, 'key', 'label' or 'issuer'), the index of the exceeded
--   usage hash for cap_exhausted. The usage of a budget without a cap is not read (answered
--   as 0, 0).
--#include _tree
local MUTABLE = {'expires_at', 'agent_run_label', 'daily_cap_micros', 'usd_cap_micros',
                 'revoked_at', 'suspended_at', 'suspended_reason'}
local key, fields = {}, {}
if ARGV[16] == '1' then
  fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do key[fields[i]] = fields[i + 1] end
else
  local row = redis.call('HMGET', KEYS[1], unpack(MUTABLE))
  for i = 1, #MUTABLE do
    if row[i] then
      key[MUTABLE[i]] = row[i]
      fields[#fields + 1] = MUTABLE[i]
      fields[#fields + 1] = row[i]
    end
  end
end
if not key['expires_at'] then
  return {'refused', 'vault_key_unknown', '', {}, {}}
end
if key['revoked_at'] then
  return {'refused', 'vault_key_revoked', '', {}, fields}
end
if tonumber(ARGV[1]) >= tonumber(key['expires_at']) then
  return {'refused', 'vault_key_expired', '', {}, fields}
end
if key['suspended_at'] then
  return {'refused', 'key_suspended', '', {}, fields}
end
local label, issuer = ARGV[18], ARGV[19]
local tree, extras = tree_limits(KEYS[8], label, issuer,
  {'!frozen:' .. (key['vendor'] or redis.call('HGET', KEYS[1], 'vendor') or '')})
if extras[1] then
  return {'refused', 'vendor_frozen', extras[1], {}, fields, tree}
end

-- The request rate of every node with a limit: all are checked before any is counted.
local limited = {}
if ARGV[2] ~= '' then
  limited[#limited + 1] = {'key', KEYS[2], ARGV[2]}
end
if tree[3] ~= '' then
  limited[#limited + 1] = {'label', KEYS[9], tree[3]}
end
if tree[6] ~= '' then
  limited[#limited + 1] = {'issuer', KEYS[10], tree[6]}
end
local oldest = tonumber(ARGV[3]) - tonumber(ARGV[4]) + 1
for _, node in ipairs(limited) do
  local flat = redis.call('HGETALL', node[2])
  local total, live, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < oldest then
      stale[#stale + 1] = flat[i]
    else
      total = total + tonumber(flat[i + 1])
      live[#live + 1] = flat[i]
      live[#live + 1] = flat[i + 1]
    end
  end
  if #stale > 0 then
    redis.call('HDEL', node[2], unpack(stale))
  end
  if total + 1 > tonumber(node[3]) then
    return {'refused', 'rate_limited', node[1], live, fields, tree}
  end
end
for _, node in ipairs(limited) do
  -- A new bucket sets the hash's TTL; it outlives every bucket that still counts.
  if redis.call('HINCRBY', node[2], ARGV[3], 1) == 1 then
    redis.call('PEXPIRE', node[2], ARGV[5])
  end
end

local server_now
local function now_ms()
  if not server_now then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return server_now
end

-- How many live members a sorted set scored by expiry has, counting expired ones only when
-- the set is at `limit` (then they are pruned first): the common case is one ZCARD.
local function live_count(set, limit)
  local count = redis.call('ZCARD', set)
  if count >= limit then
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now_ms())
    count = redis.call('ZCARD', set)
  end
  return count
end

if ARGV[6] ~= '' and live_count(KEYS[3], tonumber(ARGV[6])) >= tonumber(ARGV[6]) then
  return {'refused', 'quota_exceeded', 'objects', {}, fields}
end

local claim = false
if ARGV[7] ~= '' then
  local entry = redis.call('GET', KEYS[4])
  local state, sha, rest
  if entry then
    local colon = string.find(entry, ':', 2, true)
    local len = tonumber(string.sub(entry, 2, colon - 1))
    state = string.sub(entry, 1, 1)
    sha = string.sub(entry, colon + 1, colon + len)
    rest = string.sub(entry, colon + len + 1)
    if state == 'I' and now_ms() - tonumber(rest) > tonumber(ARGV[9]) * 1000 then
      state = nil
    end
  end
  if state then
    if sha ~= ARGV[7] then
      return {'refused', 'idempotency_mismatch', 'idempotency', {}, fields}
    end
    if state == 'I' then
      return {'refused', 'idempotency_in_flight', 'idempotency', {}, fields}
    end
    return {'replay', '', '', {}, fields, rest}
  end
  if not entry then
    if live_count(KEYS[5], tonumber(ARGV[10])) >= tonumber(ARGV[10]) then
      return {'refused', 'quota_exceeded', 'idempotency', {}, fields}
    end
  end
  claim = true
end

local usage = {}
local n = #KEYS - 10
if ARGV[11] ~= '' then
  local caps = path_caps(tree, key['daily_cap_micros'], key['usd_cap_micros'] or '', label,
                         issuer)
  if #caps ~= n then
    return redis.error_reply('admit.lua: the usage keys do not match the key\'s budget tree')
  end
  local estimate = tonumber(ARGV[12])
  for i = 1, n do
    if caps[i] ~= '' then
      local u = redis.call('HMGET', KEYS[10 + i], 'spent', 'reserved')
      usage[i] = {tonumber(u[1] or '0'), tonumber(u[2] or '0')}
    else
      usage[i] = {0, 0}
    end
  end
  if redis.call('EXISTS', KEYS[6]) == 0 then
    for i = 1, n do
      if caps[i] ~= '' and usage[i][1] + usage[i][2] + estimate > tonumber(caps[i]) then
        local reply = {'refused', 'cap_exhausted', '', {i}, fields, tree}
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
      usage[i][2] = redis.call('HINCRBY', KEYS[10 + i], 'reserved', ARGV[12])
      if ARGV[19 + i] == '1' and is_daily(KEYS[10 + i]) then
        redis.call('EXPIRE', KEYS[10 + i], ARGV[13], 'NX')
      end
      table.insert(res, 'usage_' .. i)
      table.insert(res, KEYS[10 + i])
    end
    redis.call('HSET', KEYS[6], unpack(res))
    redis.call('ZADD', KEYS[7], ARGV[1], ARGV[11])
  end
end

if claim then
  -- Replayable only while the key may call (an expired key is refused above): kept no longer,
  -- give or take a minute of clock difference between replicas.
  local ttl_ms = math.min(tonumber(ARGV[8]) * 1000,
    math.floor((tonumber(key['expires_at']) - tonumber(ARGV[1])) / 1000) + 60000)
  local started = string.format('%d', now_ms())
  redis.call('SET', KEYS[4], 'I' .. #ARGV[7] .. ':' .. ARGV[7] .. started, 'PX', ttl_ms)
  local expires = string.format('%d', now_ms() + ttl_ms)
  redis.call('ZADD', KEYS[5], expires, KEYS[4])
  if ARGV[17] == '1' then
    local ends = math.max(math.floor(tonumber(key['expires_at']) / 1000), now_ms())
    redis.call('PEXPIREAT', KEYS[5], string.format('%d', ends + 2 * ttl_ms))
  end
end

local reply = {'admitted', '', '', {}, fields, tree}
for i = 1, #usage do
  table.insert(reply, usage[i][1])
  table.insert(reply, usage[i][2])
end
return reply
