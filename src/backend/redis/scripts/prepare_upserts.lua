local usage, expiry, stash = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local kinds = ARGV[2]
local token = ARGV[3]
local plen = #ARGV[4]
local count = #KEYS - 3
local sub, min, sunpack, rcall = string.sub, math.min, struct.unpack, redis.call
local C = 67
if #kinds ~= count or #ARGV ~= 6 then
  return redis.error_reply('bevy_storage: malformed batch of upserts')
end

-- Read the records the batch replaces, before changing anything, and answer as the write
-- script does.
local result, nresult = {1}, 1
local dn, db = tonumber(ARGV[5]), tonumber(ARGV[6])
-- created_at of each live record replaced, in order, and their indexes.
local kept, at, nk = {}, {}, 0
local olds, found = {}, 0
for i = 4, count + 3, 1000 do
  local got = rcall('MGET', unpack(KEYS, i, min(i + 999, count + 3)))
  for m = 1, #got do
    olds[i - 4 + m] = got[m]
    if got[m] then found = found + 1 end
  end
end
if found < count then
  -- MGET gives false for a missing key and for one of another type: EXISTS, which counts
  -- keys of any type, tells them apart.
  local present = 0
  for i = 4, count + 3, 1000 do
    present = present + rcall('EXISTS', unpack(KEYS, i, min(i + 999, count + 3)))
  end
  if present ~= found then
    for n = 1, count do
      if not olds[n] and rcall('EXISTS', KEYS[n + 3]) == 1 then return {2, n, 1} end
    end
  end
end
if found > 0 then
  -- Check every operation before anything is written; note what each replaces.
  local rems, nr, dels, nd = {}, 0, {}, 0
  for n = 1, count do
    local old = olds[n]
    if old then
      if not is_record(old) then return {2, n, 2} end
      local oexp, osize = sunpack('<i8I4', old, 9)
      if oexp == 0 or oexp > now then
        if string.byte(kinds, n) == C then return {0, n} end
        result[nresult + 1], result[nresult + 2] = n, osize
        nresult = nresult + 2
        -- created_at carries over: the finishing script writes it over the new record.
        nk = nk + 1
        kept[nk], at[nk] = sub(old, 1, 8), n
      end
      if oexp == 0 then
        dn = dn - 1
        db = db - osize
      else
        nr = nr + 1
        rems[nr] = sub(KEYS[n + 3], plen + 1)
      end
      nd = nd + 1
      dels[nd] = KEYS[n + 3]
    end
  end
  -- Everything is checked: make room for the MSETNX that follows in the transaction.
  for i = 1, nd, 1000 do
    rcall('DEL', unpack(dels, i, min(i + 999, nd)))
  end
  for i = 1, nr, 1000 do
    rcall('ZREM', expiry, unpack(rems, i, min(i + 999, nr)))
  end
end
if dn ~= 0 or db ~= 0 then
  if rcall('HINCRBY', usage, 'n', dn) <= 0 then
    rcall('DEL', usage)
  else
    rcall('HINCRBY', usage, 'b', db)
  end
end
-- The stash for the finishing script: the token, then `A` and every record's created_at when
-- each replaced a live record (the common case of saving over existing things), else `S`
-- and, for each one that did, its index (u32) and its created_at.
if nk == count then
  rcall('SET', stash, token .. 'A' .. table.concat(kept))
else
  local pack = struct.pack
  for m = 1, nk do kept[m] = pack('<I4', at[m]) .. kept[m] end
  rcall('SET', stash, token .. 'S' .. table.concat(kept))
end
return result
