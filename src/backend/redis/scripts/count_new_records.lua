local token = redis.pcall('GET', KEYS[1])
if token then redis.call('DEL', KEYS[1]) end
if token ~= ARGV[3] then return 0 end
redis.call('HINCRBY', KEYS[2], 'n', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'b', ARGV[2])
return 1
