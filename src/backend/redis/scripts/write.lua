local usage, expiry = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local kinds = ARGV[2]
local prefix = ARGV[5]
local distinct = ARGV[6] == '1'
local count = #kinds
local byte, sub, find, min, format = string.byte, string.sub, string.find, math.min, string.format
local sunpack = struct.unpack
local rcall = redis.call
local keys, argv = KEYS, ARGV
local D, X, C, Y, V, W = 68, 88, 67, 89, 86, 87
local NO_VERSION = string.rep('\0', 8)
if #keys ~= count + 2 or #argv ~= count + 6 then
  return redis.error_reply('bevy_storage: malformed write batch')
end

local result, nresult = {1}, 1
local dn, db = tonumber(argv[3]), tonumber(argv[4])
-- Changes of the expiry index: for a batch of distinct keys the lists of members to add (score,
-- member, ...) and to remove; otherwise zset, member -> score (a decimal string) or false, so
-- that the last change of a key wins.
local adds, rems, na, nr = {}, {}, 0, 0
local zset

-- The decimal string of an expiry, for PEXPIREAT and ZADD: Redis would otherwise format each
-- Lua number itself (%.17g, a quarter of a microsecond each), and a batch's records mostly
-- share one expiry.
local lastexp, lastdecimal
local function decimal(exp)
  if exp ~= lastexp then
    lastexp, lastdecimal = exp, format('%.0f', exp)
  end
  return lastdecimal
end

-- New records without expiry, each key once (saving new things): one MSETNX, which sets them
-- all, or nothing when any of the keys exists (of any type). Tried only when the batch's first
-- and last keys are free, so that a batch over existing keys rarely pays for it.
local done = false
if distinct and count <= 2000 and not find(kinds, '[^UC]')
    and rcall('EXISTS', keys[3], keys[count + 2]) == 0 then
  local sets = {}
  for n = 1, count do
    sets[2 * n - 1], sets[2 * n] = keys[n + 2], argv[n + 6]
  end
  done = rcall('MSETNX', unpack(sets, 1, 2 * count)) == 1
end

if not done then
  -- Read the records the batch replaces, before changing anything. EXISTS counts the keys
  -- that exist, of any type; only when there are some, MGET reads them (false for a missing
  -- key and for one of another type, which the difference of the two counts reveals).
  local present = 0
  for i = 1, count, 1000 do
    present = present + rcall('EXISTS', unpack(keys, i + 2, min(i + 999, count) + 2))
  end
  local olds = {}
  if present > 0 then
    for i = 1, count, 1000 do
      local got = rcall('MGET', unpack(keys, i + 2, min(i + 999, count) + 2))
      for m = 1, #got do olds[i + m - 1] = got[m] end
    end
    local found = 0
    for n = 1, count do
      if olds[n] then found = found + 1 end
    end
    if present ~= found then
      for n = 1, count do
        if not olds[n] and rcall('EXISTS', keys[n + 2]) == 1 then return {2, n, 1} end
      end
    end
  end

  -- The server's clock, only when a record has an expiry: a record already past by it is not
  -- stored at all.
  local tnow
  if find(kinds, '[XYW]') then
    local t = rcall('TIME')
    tnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end

  -- Apply the operations in order, judging liveness at now. When a key repeats, each
  -- operation sees the record the previous one left (cur: record key -> record, or false for
  -- none). The final state of each key is queued: every record goes to sets (one MSET), those
  -- with an expiry also to pxs (PEXPIREAT after the MSET), removed keys to dels (DEL).
  local sets, pxs, dels, fixes = {}, {}, {}, {}
  local ns, np, nd, nf = 0, 0, 0, 0
  local cur, cexp = {}, {}
  local plen = #prefix
  -- Queues the final state of a key: a record with an expiry, one without, or none.
  local function queue(rkey, rec, exp)
    if rec then
      sets[ns + 1], sets[ns + 2] = rkey, rec
      ns = ns + 2
      if exp then
        pxs[np + 1], pxs[np + 2] = rkey, decimal(exp)
        np = np + 2
      end
    else
      nd = nd + 1
      dels[nd] = rkey
    end
  end
  for n = 1, count do
    local rkey, k = keys[n + 2], byte(kinds, n)
    local old
    if distinct then
      old = olds[n]
    else
      old = cur[rkey]
      if old == nil then old = olds[n] end
    end
    local rec, exp = false, nil
    -- A put conditional on a version (V, W) carries the 8 bytes of that version before its
    -- record.
    local conditional = k == V or k == W
    local expected
    if k ~= D then
      rec = argv[n + 6]
      if conditional then
        expected, rec = sub(rec, 1, 8), sub(rec, 9)
      end
      if k == X or k == Y or k == W then
        exp = sunpack('<i8', rec, 9)
        if exp <= tnow then rec, exp = false, nil end
      end
    end
    local live = false
    local hadexp = false
    if old then
      if not is_record(old) then return {2, n, 2} end
      local oexp, osize = sunpack('<i8I4', old, 9)
      live = oexp == 0 or oexp > now
      if live then
        if k == C or k == Y then return {0, n} end
        if conditional then
          local found = record_version(old)
          if found ~= expected then
            local lo, hi = sunpack('<I4I4', found .. NO_VERSION)
            return {3, n, 1, lo, hi}
          end
        end
        result[nresult + 1], result[nresult + 2] = n, osize
        nresult = nresult + 2
        -- A live record's created_at carries over: written over the stored record's first 8
        -- bytes (SETRANGE) when each key is written once, which costs less than copying the
        -- record in Lua; copied into it when a later operation of the batch may read it.
        if rec then
          if distinct then
            fixes[nf + 1], fixes[nf + 2] = rkey, sub(old, 1, 8)
            nf = nf + 2
          else
            rec = sub(old, 1, 8) .. sub(rec, 9)
          end
        end
      end
      if oexp == 0 then
        dn = dn - 1
        db = db - osize
      else
        hadexp = true
      end
    end
    if conditional and not live then return {3, n, 0} end
    if distinct then
      if exp then
        adds[na + 1], adds[na + 2] = decimal(exp), sub(rkey, plen + 1)
        na = na + 2
      elseif hadexp then
        nr = nr + 1
        rems[nr] = sub(rkey, plen + 1)
      end
      if rec or old then queue(rkey, rec, exp) end
    else
      if exp then
        zset = zset or {}
        zset[sub(rkey, plen + 1)] = decimal(exp)
      elseif hadexp then
        zset = zset or {}
        zset[sub(rkey, plen + 1)] = false
      end
      cur[rkey] = rec
      cexp[rkey] = exp
    end
  end
  if not distinct then
    for rkey, rec in pairs(cur) do queue(rkey, rec, cexp[rkey]) end
  end

  -- Everything is checked: write. MSET, then PEXPIREAT, costs less than a SET ... PXAT each.
  -- The SETRANGEs come before the PEXPIREATs: a record whose expiry passed since TIME was
  -- read is deleted by its PEXPIREAT (Redis compares with its clock of the moment), and a
  -- SETRANGE after that would recreate the key as an 8-byte string.
  for i = 1, ns, 1000 do
    rcall('MSET', unpack(sets, i, min(i + 999, ns)))
  end
  for i = 1, nf, 2 do
    rcall('SETRANGE', fixes[i], 0, fixes[i + 1])
  end
  for i = 1, np, 2 do
    rcall('PEXPIREAT', pxs[i], pxs[i + 1])
  end
  for i = 1, nd, 1000 do
    rcall('DEL', unpack(dels, i, min(i + 999, nd)))
  end
end

-- The expiry index.
if zset then
  for m, score in pairs(zset) do
    if score then
      adds[na + 1], adds[na + 2] = score, m
      na = na + 2
    else
      nr = nr + 1
      rems[nr] = m
    end
  end
end
for i = 1, na, 1000 do
  rcall('ZADD', expiry, unpack(adds, i, min(i + 999, na)))
end
for i = 1, nr, 1000 do
  rcall('ZREM', expiry, unpack(rems, i, min(i + 999, nr)))
end

if dn ~= 0 or db ~= 0 then
  if rcall('HINCRBY', usage, 'n', dn) <= 0 then
    rcall('DEL', usage)
  else
    rcall('HINCRBY', usage, 'b', db)
  end
end

-- Forget a few entries whose record Redis expired by itself (the earliest expiries go first),
-- or which no longer has an expiry.
for _, m in ipairs(rcall('ZRANGE', expiry, 0, 7)) do
  local h = record_header(prefix .. m)
  if not h or sunpack('<i8', h, 9) == 0 then
    rcall('ZREM', expiry, m)
  end
end
return result
