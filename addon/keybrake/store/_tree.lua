-- Shared by admit.lua, reserve.lua and raise_hold.lua (RedisStore inserts it where a script
-- says '--#include _tree'): the limits of the label and issuer nodes of a key's budget tree,
-- read from the tree's label-budgets hash in one HMGET. Its fields: '<label>' the label's
-- daily cap, '!life:<label>' its lifetime cap, '!rate:<label>' its request-rate limit,
-- '!iss:<issuer id>' the issuer's 'daily:lifetime:rate' (a part '' when none). Labels never
-- start with '!', so these never meet a label's own field.
local function split_limits(value)
  local out = {}
  for part in string.gmatch((value or '::') .. ':', '([^:]*):') do
    out[#out + 1] = part
  end
  return out
end

-- {label daily, label lifetime, label rate, issuer daily, issuer lifetime, issuer rate}
-- (decimal strings, '' for none), and the values of the `extra` fields read in the same HMGET.
local function tree_limits(budgets, label, issuer, extra)
  local fields = {}
  for i = 1, #extra do
    fields[#fields + 1] = extra[i]
  end
  local base = #fields
  if label ~= '' then
    fields[#fields + 1] = label
    fields[#fields + 1] = '!life:' .. label
    fields[#fields + 1] = '!rate:' .. label
  end
  if issuer ~= '' then
    fields[#fields + 1] = '!iss:' .. issuer
  end
  local got = {}
  if #fields > 0 then
    got = redis.call('HMGET', budgets, unpack(fields))
  end
  local t = {'', '', '', '', '', ''}
  local j = base + 1
  if label ~= '' then
    t[1], t[2], t[3] = got[j] or '', got[j + 1] or '', got[j + 2] or ''
    j = j + 3
  end
  if issuer ~= '' then
    local p = split_limits(got[j] or nil)
    t[4], t[5], t[6] = p[1] or '', p[2] or '', p[3] or ''
  end
  local extras = {}
  for i = 1, base do
    extras[i] = got[i]
  end
  return t, extras
end

-- The caps of the usage hashes of a key's path, in `usage_plan`'s order: key day, key
-- lifetime, label day and lifetime (with a label), issuer day and lifetime (an issuer's key).
local function path_caps(t, key_daily, key_usd, label, issuer)
  local caps = {key_daily, key_usd}
  if label ~= '' then
    caps[#caps + 1] = t[1]
    caps[#caps + 1] = t[2]
  end
  if issuer ~= '' then
    caps[#caps + 1] = t[4]
    caps[#caps + 1] = t[5]
  end
  return caps
end

-- Daily usage hashes expire; lifetime ones ('…:lifetime') never do.
local function is_daily(name)
  return string.sub(name, -9) ~= ':lifetime'
end
