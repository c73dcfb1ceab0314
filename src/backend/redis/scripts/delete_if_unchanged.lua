-- Removes a record only if it still holds the value and expiry a read returned: the check and
-- the removal of Backend::delete_if_unchanged in one script, so nothing comes between them.
-- The counters are updated as the write script updates them for a delete.
local usage, expiry, rkey = KEYS[1], KEYS[2], KEYS[3]
local want_exp, value, prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local rec = redis.pcall('GET', rkey)
if type(rec) == 'table' then return -1 end
if not rec then return 0 end
if not is_record(rec) then return -2 end
local oexp, osize = struct.unpack('<i8I4', rec, 9)
if oexp ~= want_exp or osize ~= #value then return 0 end
if osize > 0 and string.sub(rec, -osize) ~= value then return 0 end
redis.call('DEL', rkey)
if oexp == 0 then
  if redis.call('HINCRBY', usage, 'n', -1) <= 0 then
    redis.call('DEL', usage)
  else
    redis.call('HINCRBY', usage, 'b', -osize)
  end
else
  redis.call('ZREM', expiry, string.sub(rkey, #prefix + 1))
end
return 1
