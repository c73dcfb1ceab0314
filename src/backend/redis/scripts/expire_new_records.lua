local token = redis.pcall('GET', KEYS[1])
if token then redis.call('DEL', KEYS[1]) end
if token ~= ARGV[3] then return 0 end
local rcall, unpack, min = redis.call, unpack, math.min
if ARGV[1] ~= '0' then
  rcall('HINCRBY', KEYS[2], 'n', ARGV[1])
  rcall('HINCRBY', KEYS[2], 'b', ARGV[2])
end
-- A record whose expiry is already past by the server's clock is not stored: its PEXPIREAT
-- removes it at once, and it is not indexed. One whose expiry passes after TIME is read is
-- removed by Redis like any other and leaves an index entry the scripts ignore and trim.
local t = rcall('TIME')
local tnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS - 3
for i = 1, n do rcall('PEXPIREAT', KEYS[i + 3], ARGV[2 * i + 3]) end
local last = 2 * n + 4
if tonumber(ARGV[4]) > tnow then
  for i = 5, last, 1000 do rcall('ZADD', KEYS[3], unpack(ARGV, i, min(i + 999, last))) end
else
  local adds, na = {}, 0
  for i = 5, last, 2 do
    if tonumber(ARGV[i]) > tnow then
      adds[na + 1], adds[na + 2] = ARGV[i], ARGV[i + 1]
      na = na + 2
    end
  end
  for i = 1, na, 1000 do rcall('ZADD', KEYS[3], unpack(adds, i, min(i + 999, na))) end
end
return 1
