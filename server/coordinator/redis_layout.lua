-- kvctl coordinator state in Redis: one script, ARGV[1] = key prefix P, ARGV[2] = operation.
-- Each call runs atomically, so coordinators sharing this Redis never see half a batch.
--
-- P..'insts'            set of registered instance ids
-- P..'inst:'..I         hash {json = registration, hb = last heartbeat (unix s)}
-- P..'curs'             set of instance ids with a cursor
-- P..'cur:'..I          hash {inc, seq, gap, applied, duplicates, stale, gaps, dropped_entries}
-- P..'counters'         hash {unregistered, dropped_entries} (fleet-wide)
-- P..'nkeys'            number of directory keys (bounded by max_keys)
-- P..'keys'             zset of key ids, scored by first store (listing order)
-- P..'p:'..K            hash placement "owner|tier|backend" -> "instance|incarnation|size|shared"
-- P..'m:'..K            hash {t = the chunk's token ids (uint32), a = access count}
-- P..'l1s', P..'l1:'..I which keys instance I holds in L1 (fencing, stats)
-- P..'tier'             hash {l1_count, l1_size, l2_count, l2_size}
-- P..'users'            set of usage owners; P..'use:'..O hash "tier|backend|shared" -> bytes
-- P..'cap:'..I          hash "tier|backend|shared" -> "capacity|revision"
-- P..'pins'             hash key id -> pin count; P..'pinorder' zset (first-pinned order)
--
-- A key id is "chunk_hash_hex@model@kv_rank@object_group@salt"; '@' occurs in no field.

local P = ARGV[1]
local op = ARGV[2]

local function forget(kid, tier, module, owner, size)
  redis.call('HINCRBY', P .. 'tier', tier .. '_count', -1)
  redis.call('HINCRBY', P .. 'tier', tier .. '_size', -size)
  redis.call('HINCRBY', P .. 'use:' .. owner, module, -size)
  if redis.call('EXISTS', P .. 'p:' .. kid) == 0 then
    redis.call('DEL', P .. 'm:' .. kid)
    redis.call('ZREM', P .. 'keys', kid)
    redis.call('DECR', P .. 'nkeys')
  end
end

local function fence_l1(iid)
  local l1 = P .. 'l1:' .. iid
  local prefix = iid .. '|l1|'
  local kids = redis.call('SMEMBERS', l1)
  for _, kid in ipairs(kids) do
    local pk = P .. 'p:' .. kid
    local row = redis.call('HGETALL', pk)
    for i = 1, #row, 2 do
      local name = row[i]
      if string.sub(name, 1, #prefix) == prefix then
        local value = row[i + 1]
        local size = tonumber(string.match(value, '|(%d+)|[01]$'))
        redis.call('HDEL', pk, name)
        forget(kid, 'l1', 'l1|' .. string.sub(name, #prefix + 1) .. '|0', iid, size)
      end
    end
  end
  redis.call('DEL', l1)
  redis.call('SREM', P .. 'l1s', iid)
end

if op == 'register' then
  local iid, json, hb = ARGV[3], ARGV[4], ARGV[5]
  local again = redis.call('SISMEMBER', P .. 'insts', iid)
  redis.call('SADD', P .. 'insts', iid)
  redis.call('HSET', P .. 'inst:' .. iid, 'json', json, 'hb', hb)
  return again
end

if op == 'heartbeat' then
  local key = P .. 'inst:' .. ARGV[3]
  if redis.call('EXISTS', key) == 0 then return 0 end
  redis.call('HSET', key, 'hb', ARGV[4])
  return 1
end

if op == 'deregister' then
  local iid = ARGV[3]
  local was = redis.call('SREM', P .. 'insts', iid)
  redis.call('DEL', P .. 'inst:' .. iid)
  fence_l1(iid)
  redis.call('DEL', P .. 'cur:' .. iid)
  redis.call('SREM', P .. 'curs', iid)
  redis.call('DEL', P .. 'cap:' .. iid)
  return was
end

if op == 'pin' or op == 'unpin' or op == 'droppins' then
  for i = 3, #ARGV do
    local kid = ARGV[i]
    if op == 'pin' then
      if redis.call('HINCRBY', P .. 'pins', kid, 1) == 1 then
        redis.call('ZADD', P .. 'pinorder', redis.call('INCR', P .. 'pinseq'), kid)
      end
    else
      local n = tonumber(redis.call('HGET', P .. 'pins', kid) or '0')
      if op == 'droppins' or n <= 1 then
        redis.call('HDEL', P .. 'pins', kid)
        redis.call('ZREM', P .. 'pinorder', kid)
      else
        redis.call('HINCRBY', P .. 'pins', kid, -1)
      end
    end
  end
  return 1
end

if op ~= 'ingest' then
  return redis.error_reply('unknown operation ' .. op)
end

-- ingest one batch: {code (0 applied, 1 duplicate, 2 stale, 3 unregistered), gap, dropped}
local iid = ARGV[3]
local inc, seq = tonumber(ARGV[4]), tonumber(ARGV[5])
local kind, tier, backend, shared = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local max_keys = tonumber(ARGV[10])
local capacity, revision = ARGV[11], tonumber(ARGV[12])

if redis.call('SISMEMBER', P .. 'insts', iid) == 0 then
  redis.call('HINCRBY', P .. 'counters', 'unregistered', 1)
  return {3, 0, 0}
end
local ck = P .. 'cur:' .. iid
local cur = redis.call('HMGET', ck, 'inc', 'seq')
local cinc, cseq = tonumber(cur[1]), tonumber(cur[2] or '0')
if cinc ~= nil then
  if inc < cinc then
    redis.call('HINCRBY', ck, 'stale', 1)
    return {2, 0, 0}
  elseif inc > cinc then
    fence_l1(iid)
    cseq = 0
    redis.call('HSET', ck, 'gap', '0')
  elseif seq <= cseq then
    redis.call('HINCRBY', ck, 'duplicates', 1)
    return {1, 0, 0}
  end
else
  redis.call('SADD', P .. 'curs', iid)
  redis.call('HSET', ck, 'gap', '0')
end
local gap = 0
if seq > cseq + 1 then
  gap = 1
  redis.call('HSET', ck, 'gap', '1')
  redis.call('HINCRBY', ck, 'gaps', 1)
end
redis.call('HSET', ck, 'inc', ARGV[4], 'seq', ARGV[5])
redis.call('HINCRBY', ck, 'applied', 1)

local owner = iid
if shared == '1' then owner = '*' end
local name = owner .. '|' .. tier .. '|' .. backend
local module = tier .. '|' .. backend .. '|' .. shared
local dropped = 0

if kind == 'config' then
  local capk = P .. 'cap:' .. iid
  local row = redis.call('HGETALL', capk)
  for i = 1, #row, 2 do
    local rev = tonumber(string.match(row[i + 1], '|(%d+)$'))
    if rev < revision then redis.call('HDEL', capk, row[i]) end
  end
  redis.call('HSET', capk, module, capacity .. '|' .. ARGV[12])
  redis.call('SADD', P .. 'users', iid)
  redis.call('HINCRBY', P .. 'use:' .. owner, module, 0)
  redis.call('SADD', P .. 'users', owner)
  return {0, gap, 0}
end

if kind == 'store' then
  local value_head = iid .. '|' .. ARGV[4] .. '|'
  local l1 = nil
  if tier == 'l1' and shared == '0' then
    l1 = P .. 'l1:' .. iid
    redis.call('SADD', P .. 'l1s', iid)
  end
  redis.call('SADD', P .. 'users', owner)
  local count, bytes = 0, 0
  for i = 13, #ARGV, 3 do
    local kid, size, tokens = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local pk = P .. 'p:' .. kid
    local fresh = redis.call('EXISTS', pk) == 0
    local ok = true
    if fresh then
      if tonumber(redis.call('GET', P .. 'nkeys') or '0') >= max_keys then
        ok = false
        dropped = dropped + 1
      else
        redis.call('INCR', P .. 'nkeys')
        redis.call('ZADD', P .. 'keys', redis.call('INCR', P .. 'keyseq'), kid)
      end
    end
    if ok then
      local old = redis.call('HGET', pk, name)
      redis.call('HSET', pk, name, value_head .. ARGV[i + 1] .. '|' .. shared)
      if old then
        bytes = bytes + size - tonumber(string.match(old, '|(%d+)|[01]$'))
      else
        count = count + 1
        bytes = bytes + size
      end
      if tokens ~= '' then redis.call('HSET', P .. 'm:' .. kid, 't', tokens) end
      if l1 then redis.call('SADD', l1, kid) end
    end
  end
  redis.call('HINCRBY', P .. 'tier', tier .. '_count', count)
  redis.call('HINCRBY', P .. 'tier', tier .. '_size', bytes)
  redis.call('HINCRBY', P .. 'use:' .. owner, module, bytes)
  if dropped > 0 then
    redis.call('HINCRBY', ck, 'dropped_entries', dropped)
    redis.call('HINCRBY', P .. 'counters', 'dropped_entries', dropped)
  end
elseif kind == 'delete' then
  for i = 13, #ARGV do
    local kid = ARGV[i]
    local pk = P .. 'p:' .. kid
    local old = redis.call('HGET', pk, name)
    if old then
      redis.call('HDEL', pk, name)
      forget(kid, tier, module, owner, tonumber(string.match(old, '|(%d+)|[01]$')))
      if tier == 'l1' and shared == '0' then redis.call('SREM', P .. 'l1:' .. iid, kid) end
    end
  end
else -- access
  for i = 13, #ARGV do
    local kid = ARGV[i]
    if redis.call('EXISTS', P .. 'p:' .. kid) == 1 then
      redis.call('HINCRBY', P .. 'm:' .. kid, 'a', 1)
    end
  end
end
return {0, gap, dropped}
