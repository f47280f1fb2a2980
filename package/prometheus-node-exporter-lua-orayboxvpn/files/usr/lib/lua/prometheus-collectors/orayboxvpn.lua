-- orayboxvpn collector for prometheus-node-exporter-lua (openwrt/packages,
-- utils/prometheus-node-exporter-lua): the agent's per-link figures, read
-- with `ubus call orayboxvpn status` (the status document: docs/status.md
-- of orayboxvpn). The exporter provides metric(name, type, labels, value).
--
-- A stopped agent (no ubus object, or ubusd gone) is `orayboxvpn_up 0`, not
-- a failed scrape: the exporter's own node_scrape_collector_success stays 1.
-- Unknown figures (null in the document: no RTT sample yet, ...) give no
-- sample rather than a made-up 0.

local ubus = require "ubus"

local CALL_TIMEOUT = 5 -- seconds (the binding's default is 30)

-- The values each state field can take (docs/status.md), so that a graph
-- gets a 0 series for every state the object is not in.
local AGENT_STATES = { "disabled", "connecting", "connected", "degraded", "stopped", "error" }
local SESSION_STATES = { "connected", "disconnected" }
local LINK_STATES = { "closed", "connect_sent", "connect_rcvd", "established", "closing" }
local UPLINK_STATES = { "up", "waiting", "error" }

-- The exporter's print_metric writes label values as they are: escape them
-- as the text exposition format requires (\\, \", \n).
local function label(v)
  if v == nil then
    return ""
  end
  local s = tostring(v)
  s = s:gsub("\\", "\\\\")
  s = s:gsub('"', '\\"')
  s = s:gsub("\n", "\\n")
  return s
end

-- A number as the exposition format wants it, or nil (unknown: no sample).
-- Whole numbers are printed in full (counters past 1e14 would otherwise
-- come out as 1e+14 and lose digits).
local function num(v)
  if type(v) == "boolean" then
    return v and 1 or 0
  end
  if type(v) ~= "number" or v ~= v then
    return nil
  end
  if v == math.floor(v) and v > -1e15 and v < 1e15 then
    return string.format("%.0f", v)
  end
  return string.format("%.15g", v)
end

local function scaled(v, factor)
  if type(v) ~= "number" then
    return nil
  end
  return v * factor
end

local function put(m, labels, v)
  local s = num(v)
  if s ~= nil then
    m(labels, s)
  end
end

local function with(base, extra)
  local t = {}
  for k, v in pairs(base) do t[k] = v end
  for k, v in pairs(extra) do t[k] = v end
  return t
end

-- One series per known state (1 for the current one), plus the current
-- one if it is not among them.
local function one_hot(m, labels, states, current)
  local seen = false
  for _, s in ipairs(states) do
    seen = seen or s == current
    m(with(labels, { state = s }), s == current and 1 or 0)
  end
  if current ~= nil and not seen then
    m(with(labels, { state = label(current) }), 1)
  end
end

local function status()
  local conn = ubus.connect(nil, CALL_TIMEOUT)
  if not conn then
    return nil
  end
  local st = conn:call("orayboxvpn", "status", {})
  conn:close()
  if type(st) ~= "table" then
    return nil
  end
  return st
end

local function scrape_links(links)
  local m = {
    state = metric("orayboxvpn_link_state", "gauge"),
    up = metric("orayboxvpn_link_up", "gauge"),
    rtt = metric("orayboxvpn_link_rtt_seconds", "gauge"),
    rttvar = metric("orayboxvpn_link_rttvar_seconds", "gauge"),
    loss = metric("orayboxvpn_link_loss_ratio", "gauge"),
    rate = metric("orayboxvpn_link_rate_estimate_bits_per_second", "gauge"),
    measured = metric("orayboxvpn_link_rate_measured", "gauge"),
    weight = metric("orayboxvpn_link_weight", "gauge"),
    quality = metric("orayboxvpn_link_quality", "gauge"),
    age = metric("orayboxvpn_link_last_receive_age_seconds", "gauge"),
    tx_bytes = metric("orayboxvpn_link_transmit_bytes_total", "counter"),
    rx_bytes = metric("orayboxvpn_link_receive_bytes_total", "counter"),
    tx_packets = metric("orayboxvpn_link_transmit_packets_total", "counter"),
    rx_packets = metric("orayboxvpn_link_receive_packets_total", "counter"),
    ups = metric("orayboxvpn_link_ups_total", "counter"),
    downs = metric("orayboxvpn_link_downs_total", "counter"),
  }
  for _, ln in ipairs(links) do
    local l = { peer = label(ln.peer), link = label(ln.name), type = label(ln.type) }
    one_hot(m.state, l, LINK_STATES, ln.state)
    m.up(l, ln.state == "established" and 1 or 0)
    put(m.rtt, l, scaled(ln.rtt_ms, 0.001))
    put(m.rttvar, l, scaled(ln.rttvar_ms, 0.001))
    -- loss: the direction we send (reported by the peer); loss_in: what we measure
    put(m.loss, with(l, { direction = "out" }), ln.loss)
    put(m.loss, with(l, { direction = "in" }), ln.loss_in)
    put(m.rate, l, scaled(ln.rate_kbps, 1000))
    put(m.measured, l, ln.rate_measured)
    put(m.weight, l, ln.weight)
    put(m.quality, l, ln.quality)
    put(m.age, l, ln.last_rx_age)
    put(m.tx_bytes, l, ln.tx_bytes)
    put(m.rx_bytes, l, ln.rx_bytes)
    put(m.tx_packets, l, ln.tx_packets)
    put(m.rx_packets, l, ln.rx_packets)
    put(m.ups, l, ln.ups)
    put(m.downs, l, ln.downs)
  end
end

local function scrape()
  local st = status()
  metric("orayboxvpn_up", "gauge", nil, st and 1 or 0)
  if not st then
    return
  end

  metric("orayboxvpn_info", "gauge", {
    name = label(st.name), role = label(st.role), mode = label(st.mode), version = label(st.version),
  }, 1)
  one_hot(metric("orayboxvpn_state", "gauge"), {}, AGENT_STATES, st.state)
  put(metric("orayboxvpn_uptime_seconds", "gauge"), nil, st.uptime)
  put(metric("orayboxvpn_state_seconds", "gauge"), nil, st.since)

  local session_state = metric("orayboxvpn_session_state", "gauge")
  for _, s in ipairs(st.sessions or {}) do
    one_hot(session_state, { peer = label(s.name) }, SESSION_STATES, s.state)
  end

  local uplink_state = metric("orayboxvpn_uplink_state", "gauge")
  for _, u in ipairs(st.uplinks or {}) do
    one_hot(uplink_state, { uplink = label(u.name), type = label(u.type) }, UPLINK_STATES, u.state)
  end

  scrape_links(st.links or {})

  -- the agent's counters (summed over sessions), one family each, in a
  -- stable order: orayboxvpn_sent_total, orayboxvpn_delivered_total, ...
  local names = {}
  for k, v in pairs(st.counters or {}) do
    if type(k) == "string" and k:match("^[%a_][%w_]*$") and type(v) == "number" then
      names[#names + 1] = k
    end
  end
  table.sort(names)
  for _, k in ipairs(names) do
    put(metric("orayboxvpn_" .. k .. "_total", "counter"), nil, st.counters[k])
  end
end

return { scrape = scrape }
