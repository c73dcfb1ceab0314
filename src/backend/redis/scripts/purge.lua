local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local removed = 0
for _, m in ipairs(members) do
  local rkey = ARGV[2] .. m
  local h = record_header(rkey)
  local e = 0
  if h then
    e = struct.unpack('<i8', h, 9)
  end
  if e == 0 then
    redis.call('ZREM', KEYS[2], m)
  elseif e <= now then
    removed = removed + redis.call('DEL', rkey)
    redis.call('ZREM', KEYS[2], m)
  else
    redis.call('ZADD', KEYS[2], e, m)
  end
end
return {removed, #members}
