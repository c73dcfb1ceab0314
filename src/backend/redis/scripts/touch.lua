if is_record(redis.call('GETRANGE', KEYS[1], 0, 41)) then
  redis.call('SETRANGE', KEYS[1], 32, ARGV[1])
end
return 0
