local now = tonumber(ARGV[1])
local count, bytes = 0, 0
if tonumber(ARGV[3]) == 0 then
  local u = redis.call('HMGET', KEYS[1], 'n', 'b')
  count, bytes = tonumber(u[1] or 0), tonumber(u[2] or 0)
end
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
                           'LIMIT', ARGV[3], ARGV[4])
for _, m in ipairs(members) do
  local h = record_header(ARGV[2] .. m)
  if h then
    local e, size = struct.unpack('<i8I4', h, 9)
    if e ~= 0 and e > now then
      count = count + 1
      bytes = bytes + size
    end
  end
end
return {count, bytes, #members}
