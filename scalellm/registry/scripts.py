"""Lua scripts that make every registry change atomic with the event announcing it.

Each change of membership (register, heartbeat, deregister, expiry) runs as one script that
updates the worker hash, the lease index and publishes the event, so a watcher that subscribed
before taking its snapshot sees every change after it, in order, exactly once. Lease deadlines
use the Redis clock (TIME), so kvstore replicas with skewed clocks agree.

The scripts touch keys they compute from a prefix, so they need a standalone Redis (or a
single-shard deployment), not Redis Cluster.
"""

from __future__ import annotations

# Apply SADD / SREM to a set with ARGV[first..last] as members, 1000 at a time (Lua's unpack is
# bounded by its C stack).
_SET_OPS = """
local function set_op(cmd, key, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call(cmd, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: worker hash, index, blocks set.
# ARGV: worker_id, lease_id, lease_ms, info, load, registered_ms, channel, joined payload,
#       blocks payload (a reset BlockHashDelta), then the block hashes held.
# The worker's set is replaced (JOINED empties a watcher's copy) and, when not empty, announced
# as BLOCKS after JOINED.
REGISTER = (
    _NOW_MS
    + _SET_OPS
    + """
local deadline = now + tonumber(ARGV[3])
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[1], 'lease', ARGV[2], 'info', ARGV[4], 'load', ARGV[5], 'registered_ms', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], deadline)
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
set_op('SADD', KEYS[3], 10, #ARGV)
redis.call('PEXPIREAT', KEYS[3], deadline)
redis.call('PUBLISH', ARGV[7], 'JOINED ' .. ARGV[1] .. ' ' .. ARGV[8])
if #ARGV >= 10 then
  redis.call('PUBLISH', ARGV[7], 'BLOCKS ' .. ARGV[1] .. ' ' .. ARGV[9])
end
return deadline
"""
)

# KEYS: worker hash, index, blocks set.
# ARGV: worker_id, lease_id, lease_ms, load, channel, blocks payload ('' for no change),
#       reset ('1' or '0'), number of added hashes, then the added hashes, then the removed ones.
# Returns 1 renewed, 0 unknown lease, -1 superseded by another registration.
HEARTBEAT = (
    """
local lease = redis.call('HGET', KEYS[1], 'lease')
if not lease then return 0 end
if lease ~= ARGV[2] then return -1 end
"""
    + _NOW_MS
    + _SET_OPS
    + """
local deadline = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'load', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], deadline)
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
redis.call('PUBLISH', ARGV[5], 'LOAD ' .. ARGV[1] .. ' ' .. ARGV[4])
if ARGV[7] == '1' then redis.call('DEL', KEYS[3]) end
local added_last = 8 + tonumber(ARGV[8])
set_op('SADD', KEYS[3], 9, added_last)
set_op('SREM', KEYS[3], added_last + 1, #ARGV)
redis.call('PEXPIREAT', KEYS[3], deadline)
if ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[5], 'BLOCKS ' .. ARGV[1] .. ' ' .. ARGV[6])
end
return 1
"""
)

# KEYS: worker hash, index, blocks set.  ARGV: worker_id, lease_id, channel.
# Returns 1 removed, 0 unknown (an expired entry is left to the reaper), -1 superseded.
DEREGISTER = """
local lease = redis.call('HGET', KEYS[1], 'lease')
if not lease then return 0 end
if lease ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'LEFT ' .. ARGV[1])
return 1
"""

# KEYS: index.  ARGV: worker key prefix, channel, limit, blocks key prefix.  Returns the ids it
# expired. Only the replica whose script removes an id from the index announces it: exactly once.
REAP = (
    _NOW_MS
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local expired = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local pttl = redis.call('PTTL', key)
  if pttl == -1 then
    redis.call('DEL', key)
    pttl = -2
  end
  if pttl == -2 then
    redis.call('DEL', ARGV[4] .. id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('PUBLISH', ARGV[2], 'EXPIRED ' .. id)
    table.insert(expired, id)
  else
    redis.call('ZADD', KEYS[1], now + pttl, id)
  end
end
return expired
"""
)

# KEYS: index.  ARGV: worker key prefix.  Returns {id, info, load, registered_ms} per live worker.
SNAPSHOT = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'info', 'load', 'registered_ms')
  if v[1] then table.insert(out, {id, v[1], v[2], v[3]}) end
end
return out
"""
