-- TEST FIXTURE: a stand-in for OpenWrt's Lua ubus binding (package
-- libubus-lua, ubus.git lua/ubus.c, openwrt-24.10 pin 60e0404), for hosts
-- without ubusd. It mirrors what a caller of the status method sees:
--
-- * ubus_lua_connect: ubus.connect([socket[, timeout]]) returns a
--   connection, or nil and UBUS_STATUS_UNKNOWN_ERROR (9) when ubusd is not
--   reachable (socket and timeout are checked like luaL_optstring/optint);
-- * ubus_lua_call: conn:call(path, method, args) checks path and method are
--   strings and args a table (luaL_checktype: a Lua error otherwise); an
--   object that is not registered gives nil, UBUS_STATUS_NOT_FOUND (4)
--   (ubus_lookup_id), a method the object lacks nil, METHOD_NOT_FOUND (3);
--   otherwise the reply as a table. The reply is what ubus_lua_parse_blob
--   makes of the blobmsg the object sent: the test builds it from the
--   object's real blob encoding (tests/test_monitoring.py lua_literal), so
--   null (BLOBMSG_TYPE_UNSPEC) fields are absent, INT8 is a boolean, ...
-- * conn:close() (ubus_lua__gc) and conn:objects() (ubus_lua_objects).
--
-- The bus is described by the Lua file named in MPVPN_TEST_UBUS: it returns
-- { ubusd = true|false, objects = { [path] = { [method] = reply } } }.

local UBUS_STATUS_METHOD_NOT_FOUND = 3
local UBUS_STATUS_NOT_FOUND = 4
local UBUS_STATUS_UNKNOWN_ERROR = 9

local ubus = {}
local conn_mt = {}
conn_mt.__index = conn_mt

local function bus()
  local path = os.getenv("MPVPN_TEST_UBUS")
  assert(path, "MPVPN_TEST_UBUS names the stand-in bus description")
  return dofile(path)
end

function ubus.connect(sock, timeout)
  if sock ~= nil and type(sock) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(sock) .. ")", 2)
  end
  if timeout ~= nil and type(timeout) ~= "number" then
    error("bad argument #2 to 'connect' (number expected, got " .. type(timeout) .. ")", 2)
  end
  local b = bus()
  if not b.ubusd then
    return nil, UBUS_STATUS_UNKNOWN_ERROR
  end
  return setmetatable({ bus = b, open = true }, conn_mt)
end

local function check(conn)
  if getmetatable(conn) ~= conn_mt then
    error("bad argument #1 (ubus.connection expected)", 3)
  end
  if not conn.open then
    -- the real binding frees the context in close(): a later call crashes;
    -- the stand-in makes that a test failure
    error("call on a closed ubus connection", 3)
  end
end

function conn_mt.call(conn, path, method, args)
  check(conn)
  if type(path) ~= "string" then error("bad argument #2 to 'call' (string expected)", 2) end
  if type(method) ~= "string" then error("bad argument #3 to 'call' (string expected)", 2) end
  if type(args) ~= "table" then error("bad argument #4 to 'call' (table expected)", 2) end
  local obj = conn.bus.objects and conn.bus.objects[path]
  if obj == nil then
    return nil, UBUS_STATUS_NOT_FOUND
  end
  local reply = obj[method]
  if reply == nil then
    return nil, UBUS_STATUS_METHOD_NOT_FOUND
  end
  return reply
end

function conn_mt.objects(conn)
  check(conn)
  local out = {}
  for path in pairs(conn.bus.objects or {}) do
    out[#out + 1] = path
  end
  return out
end

function conn_mt.close(conn)
  check(conn)
  conn.open = false
end

return ubus
