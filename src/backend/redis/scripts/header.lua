-- Shared by the scripts that read records: scripts.rs puts this file between each script's
-- shebang and its body when it builds them, so the check is written once.

-- True when `h`, a record or its first 42 bytes, starts with a record header of key layout 2:
-- 42 bytes, the last of them the layout version (see record.rs for the header's fields).
local function is_record(h)
  return type(h) == 'string' and #h >= 42 and string.byte(h, 42) == 2
end

-- The 42-byte header of the record under `rkey`, or nil when there is none: the key is
-- missing, holds another Redis type, or a string that is not a record of key layout 2.
local function record_header(rkey)
  local h = redis.pcall('GETRANGE', rkey, 0, 41)
  if is_record(h) then return h end
end
