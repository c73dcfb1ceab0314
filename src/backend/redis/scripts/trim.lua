local offset = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[2], offset, offset + tonumber(ARGV[3]) - 1)
local removed = 0
for _, m in ipairs(members) do
  local h = record_header(ARGV[1] .. m)
  if not h or struct.unpack('<i8', h, 9) == 0 then
    redis.call('ZREM', KEYS[2], m)
    removed = removed + 1
  end
end
return {#members, removed}
