/* SPDX-License-Identifier: GPL-2.0-only */
/* luci-app-statistics graphs of what /usr/libexec/collectd/orayboxvpn
 * reports: plugin "orayboxvpn" with no instance for the agent, and
 * instance "<peer>.<link>" for each subflow (docs/monitoring.md). */

'use strict';
'require baseclass';

/* Keep only the types and instances collectd has a file for (a figure the
 * agent never knew, e.g. no RTT sample yet, has none): rrdtool refuses a
 * graph that names a missing file. Drops a graph left with nothing. */
function present(graph, host, plugin, plugin_instance, defs) {
	var types = graph.dataTypes(host, plugin, plugin_instance);

	return defs.filter(function(def) {
		var data = def.data;

		if (data.instances) {
			var kept = {};

			Object.keys(data.instances).forEach(function(type) {
				var have = graph.dataInstances(host, plugin, plugin_instance, type),
				    want = data.instances[type].filter(function(i) { return have.indexOf(i) >= 0; });

				if (want.length)
					kept[type] = want;
			});

			data.instances = kept;
			return Object.keys(kept).length > 0;
		}

		data.types = data.types.filter(function(t) { return types.indexOf(t) >= 0; });
		return data.types.length > 0;
	});
}

function prefixed(graph, host, plugin, plugin_instance, prefix) {
	return graph.dataInstances(host, plugin, plugin_instance, 'gauge').filter(function(i) {
		return i.indexOf(prefix) == 0;
	});
}

function agent(graph, host, plugin) {
	return [ {
		title: "%H: Multipath VPN agent (1 = answering / connected)",
		vlabel: " ",
		y_min: "0",
		y_max: "1",
		number_format: "%3.0lf",
		data: {
			instances: { gauge: [ "up", "connected" ] },
			options: {
				gauge_up: { title: "Agent answering", noarea: true, overlay: true },
				gauge_connected: { title: "Connected", noarea: true, overlay: true }
			}
		}
	}, {
		title: "%H: Multipath VPN sessions (1 = connected)",
		vlabel: " ",
		y_min: "0",
		y_max: "1",
		number_format: "%3.0lf",
		data: {
			instances: { gauge: prefixed(graph, host, plugin, '', 'session.') },
			options: { gauge: { noarea: true, overlay: true } }
		}
	}, {
		title: "%H: Multipath VPN uplinks (1 = socket up)",
		vlabel: " ",
		y_min: "0",
		y_max: "1",
		number_format: "%3.0lf",
		data: {
			instances: { gauge: prefixed(graph, host, plugin, '', 'uplink.') },
			options: { gauge: { noarea: true, overlay: true } }
		}
	}, {
		title: "%H: Multipath VPN agent uptime",
		vlabel: "s",
		number_format: "%8.0lf s",
		data: {
			types: [ "uptime" ],
			options: { uptime: { title: "Uptime", noarea: true } }
		}
	}, {
		title: "%H: Multipath VPN counters",
		vlabel: "1/s",
		number_format: "%8.2lf",
		data: {
			types: [ "derive" ],
			options: { derive: { noarea: true, overlay: true } }
		}
	} ];
}

function subflow() {
	return [ {
		title: "%H: Multipath VPN subflow %pi: round-trip time",
		vlabel: "ms",
		y_min: "0",
		number_format: "%6.1lf ms",
		data: {
			types: [ "ping", "ping_stddev" ],
			options: {
				ping__value: { title: "RTT", noarea: true, overlay: true },
				ping_stddev__value: { title: "RTT variation", noarea: true, overlay: true }
			}
		}
	}, {
		title: "%H: Multipath VPN subflow %pi: loss (out: reported by the peer, in: measured here)",
		vlabel: "%",
		y_min: "0",
		number_format: "%5.2lf %%",
		data: {
			instances: { ping_droprate: [ "out", "in" ] },
			options: {
				ping_droprate_out: { title: "Loss out", noarea: true, overlay: true, transform_rpn: "100,*" },
				ping_droprate_in: { title: "Loss in", noarea: true, overlay: true, transform_rpn: "100,*" }
			}
		}
	}, {
		title: "%H: Multipath VPN subflow %pi: traffic",
		vlabel: "Bytes/s",
		number_format: "%5.1lf%sB/s",
		totals_format: "%5.1lf%sB",
		data: {
			types: [ "if_octets" ],
			sources: { if_octets: [ "tx", "rx" ] },
			options: {
				if_octets__tx: { title: "Bytes (TX)", total: true, color: "00ff00" },
				if_octets__rx: { title: "Bytes (RX)", flip: true, total: true, color: "0000ff" }
			}
		}
	}, {
		title: "%H: Multipath VPN subflow %pi: packets",
		vlabel: "Packets/s",
		number_format: "%5.1lf P/s",
		data: {
			types: [ "if_packets" ],
			sources: { if_packets: [ "tx", "rx" ] },
			options: {
				if_packets__tx: { title: "Packets (TX)", overlay: true, color: "00ff00" },
				if_packets__rx: { title: "Packets (RX)", overlay: true, flip: true, color: "0000ff" }
			}
		}
	}, {
		title: "%H: Multipath VPN subflow %pi: upload rate estimate",
		vlabel: "bit/s",
		number_format: "%5.1lf%sbit/s",
		data: {
			instances: { bitrate: [ "estimate" ] },
			options: { bitrate_estimate: { title: "Rate estimate", noarea: true } }
		}
	}, {
		title: "%H: Multipath VPN subflow %pi: established, scheduler weight and quality",
		vlabel: " ",
		y_min: "0",
		number_format: "%5.3lf",
		data: {
			instances: { gauge: [ "up", "weight", "quality" ] },
			options: {
				gauge_up: { title: "Established", noarea: true, overlay: true },
				gauge_weight: { title: "Weight", noarea: true, overlay: true },
				gauge_quality: { title: "Quality", noarea: true, overlay: true }
			}
		}
	} ];
}

return baseclass.extend({
	title: _('Multipath VPN'),

	rrdargs: function(graph, host, plugin, plugin_instance, dtype) {
		var defs = (plugin_instance == '') ? agent(graph, host, plugin) : subflow();

		return present(graph, host, plugin, plugin_instance, defs);
	}
});
