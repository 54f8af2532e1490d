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
-- ARGV[2]  request-rate limit, or '' for none; ARGV[3] the current 5-second bucket
-- ARGV[4]  object quota, or '' when the call creates nothing
-- ARGV[5]  body sha256 of an idempotency claim, or '' for none; ARGV[6] its TTL s (at most
--          until the key expires),
--          ARGV[7] seconds after which an in-flight claim is stale, ARGV[8] max entries
-- ARGV[9]  reservation id, or '' for a free call; ARGV[10] estimate µs; ARGV[11] key id
-- ARGV[12] the key's label, ARGV[13] the issuer that minted it ('' for none; both never change)
-- ARGV[14] what the caller has not done yet, '' when it has done it all (the common case),
--          else one '1' or '0' per item:
--          [1] answer every field of the key record (HGETALL), not only the fields that can
--              change (the caller keeps the rest, which never changes, from an earlier answer)
--          [2] give the idempotency index its TTL (the key's expiry + twice the entry TTL: no
--              entry outlives it)
--          [2+i] give usage hash i, when daily, its TTL if it has none (EXPIRE NX; their names
--              carry the day: a TTL set once is the right one)
-- The constants (RATE_BUCKETS, RATE_TTL_MS, DAILY_USAGE_TTL) are written into the script
-- when it is loaded (the _consts include below), not sent with every call.
-- An idempotency entry is one string: 'I' or 'D' (in flight, done), the length of the body
-- hash, ':', the body hash, then the claim's start (server ms) or the stored response.
-- Only what a step needs is read or written: a TTL is set once (ARGV[14]), expired index
-- entries are pruned only when a quota is reached, and the server clock is read at most once.
-- Returns {status, code, detail, extra, key fields (flattened, as a nested table),
--          tree limits (6, see _tree.lua), usage (spent, reserved, … of each budget with a
--          cap, in path order) | replay's stored response}.
--   status 'admitted' | 'replay' | 'refused'; extra: live rate buckets (flattened) for
--   rate_limited (detail: the node, 'key', 'label' or 'issuer'), the index (in the path) of
--   the exceeded usage hash for cap_exhausted. The usage of a budget without a cap is
--   neither read nor answered.
--#include _consts
--#include _tree
--#include _rate
local MUTABLE = {'expires_at', 'agent_run_label', 'daily_cap_micros', 'usd_cap_micros',
                 'revoked_at', 'suspended_at', 'suspended_reason'}
local todo = ARGV[14]
local function to_do(i)
  return todo ~= '' and string.sub(todo, i, i) == '1'
end
-- The vendor never changes (the caller keeps it), but the freeze check below needs it: read
-- in the same HMGET, not answered. The fields are kept in the row (no table of their own).
local row = redis.call('HMGET', KEYS[1], 'vendor', unpack(MUTABLE))
local fields = {}
if to_do(1) then
  fields = redis.call('HGETALL', KEYS[1])
else
  for i = 1, #MUTABLE do
    if row[i + 1] then
      fields[#fields + 1] = MUTABLE[i]
      fields[#fields + 1] = row[i + 1]
    end
  end
end
-- row: vendor, then MUTABLE's order
if not row[2] then
  return {'refused', 'vault_key_unknown', '', {}, {}}
end
if row[6] then
  return {'refused', 'vault_key_revoked', '', {}, fields}
end
-- Numbers are read from their strings once (each conversion costs about as much as a short
-- command), and names are constants rather than built per call.
local now_us, expires_us = tonumber(ARGV[1]), tonumber(row[2])
if now_us >= expires_us then
  return {'refused', 'vault_key_expired', '', {}, fields}
end
if row[7] then
  return {'refused', 'key_suspended', '', {}, fields}
end
local label, issuer = ARGV[12], ARGV[13]
local tree, extras = tree_limits(KEYS[8], label, issuer,
  {'!frozen:' .. (row[1] or '')})
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
local current = tonumber(ARGV[3])
local oldest = current - RATE_BUCKETS + 1
for _, node in ipairs(limited) do
  if rate_total(node[2], oldest, current, RATE_TTL_MS) + 1 > tonumber(node[3]) then
    return {'refused', 'rate_limited', node[1], rate_live(node[2], oldest), fields, tree}
  end
end
for _, node in ipairs(limited) do
  rate_count(node[2], ARGV[3], RATE_TTL_MS)
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

local quota = ARGV[4] ~= '' and tonumber(ARGV[4])
if quota and live_count(KEYS[3], quota) >= quota then
  return {'refused', 'quota_exceeded', 'objects', {}, fields}
end

-- The claim is written first, with SET NX GET (one command: the entry before, or none); a
-- refusal further down deletes the claim it wrote.
local claim, created = false, false
if ARGV[5] ~= '' then
  -- Replayable only while the key may call (an expired key is refused above): kept no longer,
  -- give or take a minute of clock difference between replicas.
  claim = {ttl = math.min(tonumber(ARGV[6]) * 1000,
                          math.floor((expires_us - now_us) / 1000) + 60000)}
  claim.value = 'I' .. #ARGV[5] .. ':' .. ARGV[5] .. string.format('%d', now_ms())
  local entry = redis.call('SET', KEYS[4], claim.value, 'NX', 'PX', claim.ttl, 'GET')
  local state, sha, rest
  if entry then
    local colon = string.find(entry, ':', 2, true)
    local len = tonumber(string.sub(entry, 2, colon - 1))
    state = string.sub(entry, 1, 1)
    sha = string.sub(entry, colon + 1, colon + len)
    rest = string.sub(entry, colon + len + 1)
    if state == 'I' and now_ms() - tonumber(rest) > tonumber(ARGV[7]) * 1000 then
      state = nil
    end
  end
  if state then
    if sha ~= ARGV[5] then
      return {'refused', 'idempotency_mismatch', 'idempotency', {}, fields}
    end
    if state == 'I' then
      return {'refused', 'idempotency_in_flight', 'idempotency', {}, fields}
    end
    return {'replay', '', '', {}, fields, rest}
  end
  created = not entry
  if created then
    local most = tonumber(ARGV[8])
    if live_count(KEYS[5], most) >= most then
      redis.call('DEL', KEYS[4])
      return {'refused', 'quota_exceeded', 'idempotency', {}, fields}
    end
  end
end

local spent, reserved, caps = {}, {}, {}
local n = #KEYS - 10
-- The usage of the budgets with a cap, in path order, after `fields` and `tree`.
local function with_usage(reply)
  for i = 1, #spent do
    if caps[i] ~= '' then
      reply[#reply + 1] = spent[i]
      reply[#reply + 1] = reserved[i]
    end
  end
  return reply
end
if ARGV[9] ~= '' then
  caps = path_caps(tree, row[4], row[5] or '', label, issuer)
  if #caps ~= n then
    if created then
      redis.call('DEL', KEYS[4])
    end
    return redis.error_reply('admit.lua: the usage keys do not match the key\'s budget tree')
  end
  local estimate = tonumber(ARGV[10])
  local over = nil
  for i = 1, n do
    if caps[i] ~= '' then
      local u = redis.call('HMGET', KEYS[10 + i], 'spent', 'reserved')
      spent[i], reserved[i] = tonumber(u[1] or 0), tonumber(u[2] or 0)
      if not over and spent[i] + reserved[i] + estimate > tonumber(caps[i]) then
        over = i
      end
    else
      spent[i], reserved[i] = 0, 0
    end
  end
  if over then
    if created then
      redis.call('DEL', KEYS[4])
    end
    return with_usage({'refused', 'cap_exhausted', '', {over}, fields, tree})
  end
  -- A reservation id already open is never reserved twice (ZADD NX answers 0): the open set
  -- is the check, so it costs no command of its own.
  -- The record holds what settling it needs, and the key and time for `holds`.
  if redis.call('ZADD', KEYS[7], 'NX', ARGV[1], ARGV[9]) == 1 then
    for i = 1, n do
      reserved[i] = redis.call('HINCRBY', KEYS[10 + i], 'reserved', ARGV[10])
      if to_do(2 + i) and is_daily(KEYS[10 + i]) then
        redis.call('EXPIRE', KEYS[10 + i], DAILY_USAGE_TTL, 'NX')
      end
    end
    -- The usage hashes in one field (see _reservation.lua).
    redis.call('HSET', KEYS[6], 'state', 'reserved', 'key_id', ARGV[11], 'estimate', ARGV[10],
               'created_at', ARGV[1], 'usage', table.concat(KEYS, '\n', 11, 10 + n))
  end
end

if claim then
  if not created then
    -- A stale in-flight claim is taken over.
    redis.call('SET', KEYS[4], claim.value, 'PX', claim.ttl)
  end
  redis.call('ZADD', KEYS[5], string.format('%d', now_ms() + claim.ttl), KEYS[4])
  if to_do(2) then
    local ends = math.max(math.floor(expires_us / 1000), now_ms())
    redis.call('PEXPIREAT', KEYS[5], string.format('%d', ends + 2 * claim.ttl))
  end
end

return with_usage({'admitted', '', '', {}, fields, tree})
