-- TEST FIXTURE: runs prometheus-node-exporter-lua collectors as the real
-- exporter does (openwrt/packages utils/prometheus-node-exporter-lua,
-- files/usr/bin/prometheus-node-exporter-lua): the same global metric() and
-- print_metric() (a "# TYPE" line per metric() call, label values written
-- as they are, labels in pairs() order), each collector loaded with
-- require('prometheus-collectors.<name>') and scraped through pcall as in
-- timed_scrape, with node_scrape_collector_duration_seconds and
-- node_scrape_collector_success (TYPE lines first, samples after each scrape). Not the real
-- script: that one needs luasocket and uhttpd, and reads the collectors
-- from /usr/lib/lua/prometheus-collectors only.
--
--   lua5.1 exporter.lua COLLECTOR...   (package.path must reach the collectors)

function print_metric(metric, labels, value)
  local label_string = ""
  if labels then
    for label, value in pairs(labels) do
      label_string = label_string .. label .. '="' .. value .. '",'
    end
    label_string = "{" .. string.sub(label_string, 1, -2) .. "}"
  end
  output(string.format("%s%s %s", metric, label_string, value))
end

function metric(name, mtype, labels, value)
  output("# TYPE " .. name .. " " .. mtype)
  local outputter = function(labels, value)
    print_metric(name, labels, value)
  end
  if value then
    outputter(labels, value)
  end
  return outputter
end

output = print

-- run_all_collectors / timed_scrape (os.clock for socket.gettime)
local metric_duration = metric("node_scrape_collector_duration_seconds", "gauge")
local metric_success = metric("node_scrape_collector_success", "gauge")
for _, cname in ipairs(arg) do
  local mod = require("prometheus-collectors." .. cname)
  local start_time = os.clock()
  local success = 1
  local status, err = pcall(mod.scrape)
  if not status then
    success = 0
    io.stderr:write(err)
  end
  local labels = { collector = cname }
  metric_duration(labels, os.clock() - start_time)
  metric_success(labels, success)
end
