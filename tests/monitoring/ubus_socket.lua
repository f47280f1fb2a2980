-- TEST HOOK (loaded with lua -e before a script): ubus.connect() without a
-- socket path connects to $MPVPN_UBUS_SOCKET, the socket of the ubusd a test
-- started, instead of the router's /var/run/ubus/ubus.sock. The binding is
-- otherwise untouched.
local ubus = require "ubus"
local connect = ubus.connect
ubus.connect = function(sock, timeout)
  return connect(sock or os.getenv("MPVPN_UBUS_SOCKET"), timeout)
end
