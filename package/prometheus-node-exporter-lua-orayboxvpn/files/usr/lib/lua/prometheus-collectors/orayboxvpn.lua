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
  if type(v) ~= "number" or v ~= v or v == math.huge or v == -math.huge then
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

-- One family at a time, every link's series in it: the exposition format
-- wants each family's lines together.
local function per_link(links, name, mtype, each)
  local m = metric(name, mtype)
  for _, ln in ipairs(links) do
    each(m, { peer = label(ln.peer), link = label(ln.name), type = label(ln.type) }, ln)
  end
end

-- family suffix, type, field of the document, factor to the family's unit
local LINK_FIGURES = {
  { "rtt_seconds", "gauge", "rtt_ms", 0.001 },
  { "rttvar_seconds", "gauge", "rttvar_ms", 0.001 },
  { "rate_estimate_bits_per_second", "gauge", "rate_kbps", 1000 },
  { "rate_measured", "gauge", "rate_measured" },
  { "weight", "gauge", "weight" },
  { "quality", "gauge", "quality" },
  { "last_receive_age_seconds", "gauge", "last_rx_age" },
  { "transmit_bytes_total", "counter", "tx_bytes" },
  { "receive_bytes_total", "counter", "rx_bytes" },
  { "transmit_packets_total", "counter", "tx_packets" },
  { "receive_packets_total", "counter", "rx_packets" },
  { "ups_total", "counter", "ups" },
  { "downs_total", "counter", "downs" },
}

local function scrape_links(links)
  per_link(links, "orayboxvpn_link_state", "gauge", function(m, l, ln)
    one_hot(m, l, LINK_STATES, ln.state)
  end)
  per_link(links, "orayboxvpn_link_up", "gauge", function(m, l, ln)
    m(l, ln.state == "established" and 1 or 0)
  end)
  -- loss: the direction we send (reported by the peer); loss_in: what we measure
  per_link(links, "orayboxvpn_link_loss_ratio", "gauge", function(m, l, ln)
    put(m, with(l, { direction = "out" }), ln.loss)
    put(m, with(l, { direction = "in" }), ln.loss_in)
  end)
  for _, f in ipairs(LINK_FIGURES) do
    local field, factor = f[3], f[4]
    per_link(links, "orayboxvpn_link_" .. f[1], f[2], function(m, l, ln)
      local v = ln[field]
      if factor then
        v = scaled(v, factor)
      end
      put(m, l, v)
    end)
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
