local stash = redis.pcall('GET', KEYS[1])
if stash then redis.call('DEL', KEYS[1]) end
local token = ARGV[1]
local t = #token
if type(stash) ~= 'string' or string.sub(stash, 1, t) ~= token then return 0 end
local sunpack, sub, rcall, keys = struct.unpack, string.sub, redis.call, KEYS
if string.byte(stash, t + 1) == 65 then
  -- 'A': every record replaced a live one, whose created_at follow in order.
  local base = t + 2 - 8
  for n = 1, #keys - 1 do
    local from = base + 8 * n
    rcall('SETRANGE', keys[n + 1], 0, sub(stash, from, from + 7))
  end
else
  for from = t + 2, #stash, 12 do
    rcall('SETRANGE', keys[sunpack('<I4', stash, from) + 1], 0, sub(stash, from + 4, from + 11))
  end
end
return 1
