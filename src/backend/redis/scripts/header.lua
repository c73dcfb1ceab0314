-- Shared by the scripts that read records: scripts.rs puts this file between each script's
-- shebang and its body when it builds them, so the check is written once.

-- True when `h`, a record or its first 42 bytes, starts with a record header: byte 42 is the
-- key layout, 2 (a 42-byte header) or 3 (50 bytes: the same and the record's version); see
-- record.rs for the header's fields.
local function is_record(h)
  if type(h) ~= 'string' or #h < 42 then return false end
  local layout = string.byte(h, 42)
  return layout == 3 or layout == 2
end

-- The first 42 bytes of the header of the record under `rkey` (every field but the version),
-- or nil when there is none: the key is missing, holds another Redis type, or a string that
-- is not a record.
local function record_header(rkey)
  local h = redis.pcall('GETRANGE', rkey, 0, 41)
  if is_record(h) then return h end
end

-- The 8 bytes of the version of the record `rec` (a whole record that is_record accepted):
-- those after the 42 bytes of layout 3, or eight zero bytes for layout 2 (version 0).
local function record_version(rec)
  if string.byte(rec, 42) == 3 then return string.sub(rec, 43, 50) end
  return string.rep('\0', 8)
end
