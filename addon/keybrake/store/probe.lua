-- Whether this server takes the forms of Redis 7.0 that the other scripts rely on: SET with
-- NX and GET together (admit.lua's idempotency claim), EXPIRE ... NX (a day's usage gets its
-- TTL once) and PEXPIREAT ... GT (record_objects.lua). An older server answers a syntax
-- error, which `RedisStore.open` turns into a refusal to start.
--
-- KEYS[1]: a scratch name under the store's prefix, deleted before returning.
redis.call('SET', KEYS[1], '1', 'NX', 'PX', '60000', 'GET')
redis.call('EXPIRE', KEYS[1], '60', 'NX')
redis.call('PEXPIREAT', KEYS[1], '1', 'GT')
redis.call('DEL', KEYS[1])
return 1
