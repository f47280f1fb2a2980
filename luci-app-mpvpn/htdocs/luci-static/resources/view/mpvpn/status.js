'use strict';
'require view';
'require rpc';
'require poll';
'require ui';
'require dom';

/*
 * Status of the orayboxvpn agent (docs/status.md in the orayboxvpn sources):
 * session header, one table row per subflow with its scheduler weight and a
 * short RTT/loss history, the per-host link policies, the link test (started
 * with the "Test links" button, followed through the status document's
 * link_test) and the agent's counters.  Everything is built with
 * E(); text from the agent is only ever passed as array children (text nodes),
 * never as markup.
 */

var callStatus = rpc.declare({
	object: 'orayboxvpn',
	method: 'status',
	expect: { '': {} },
	reject: true
});

var callReconnect = rpc.declare({
	object: 'orayboxvpn',
	method: 'reconnect',
	expect: { '': {} },
	reject: true
});

/* { duration: seconds per phase, 1..10 } -> { started: true, id } or { error } */
var callTestLinks = rpc.declare({
	object: 'orayboxvpn',
	method: 'test_links',
	params: [ 'duration' ],
	expect: { '': {} },
	reject: true
});

var POLL_INTERVAL = 3;    /* seconds */
var HISTORY_POINTS = 60;  /* samples kept per subflow: 3 minutes at one per poll */
var MIN_SAMPLE = 1;       /* seconds between two samples of a subflow's counters */
var TEST_DURATIONS = [ 1, 2, 3, 5, 10 ];  /* seconds per link test phase (the agent takes 1..10) */
var TEST_DEFAULT_DURATION = 3;
var SVG_NS = 'http://www.w3.org/2000/svg';
var NONE = '\u2014';

var GREEN = '#3c9a3c', ORANGE = '#d58512', RED = '#c9302c', GREY = '#888888';
var RTT_COLOR = '#337ab7', LOSS_COLOR = '#d9534f';

var COUNTERS = [
	[ 'delivered', _('Delivered to the LAN') ],
	[ 'sent', _('Sent into the tunnel') ],
	[ 'duplicates', _('Duplicates discarded') ],
	[ 'late', _('Late copies discarded') ],
	[ 'deadline_releases', _('Reorder releases (hold deadline)') ],
	[ 'reorder_flushes', _('Reorder buffer flushes') ],
	[ 'auth_failures', _('Authentication failures') ],
	[ 'replays', _('Replays rejected') ],
	[ 'malformed', _('Malformed datagrams') ],
	[ 'unknown_session', _('Datagrams for an unknown session') ],
	[ 'tx_no_subflow', _('Dropped: no subflow up') ],
	[ 'tun_write_errors', _('Tunnel write errors') ]
];

/* per-policy counters with a label of their own; others are shown by their key */
var POLICY_COUNTERS = {
	flows: _('Flows'),
	packets: _('Packets'),
	bytes: _('Bytes'),
	tx_packets: _('Packets sent'),
	tx_bytes: _('Bytes sent'),
	rx_packets: _('Packets received'),
	rx_bytes: _('Bytes received')
};

/* keys of a policy entry that are its configuration, not counters */
var POLICY_FIELDS = { name: true, src: true, dst: true, carriers: true, exclusive: true, mode: true, priority: true, enabled: true, counters: true };

/* counters that point at an attack or a misconfiguration when they grow */
var ALARM_COUNTERS = { auth_failures: true, replays: true, malformed: true, unknown_session: true };

function isNum(v) {
	return (typeof(v) == 'number' && isFinite(v));
}

function isObj(v) {
	return (v != null && typeof(v) == 'object' && !Array.isArray(v));
}

function text(v) {
	return (v == null || v === '') ? NONE : String(v);
}

function badge(label, color, state) {
	return E('span', {
		'class': 'label mpvpn-badge',
		'data-state': (state != null) ? String(state) : null,
		'style': 'display:inline-block;padding:0 .5em;border-radius:3px;color:#fff;background:' + color
	}, [ label ]);
}

function sessionState(state) {
	switch (state) {
	case 'connected':  return [ _('Connected'), GREEN ];
	case 'degraded':   return [ _('Degraded'), RED ];
	case 'connecting': return [ _('Connecting'), ORANGE ];
	case 'disabled':   return [ _('Disabled'), GREY ];
	case 'stopped':    return [ _('Stopped'), GREY ];
	case 'error':      return [ _('Error'), RED ];
	default:           return [ (state != null) ? String(state) : _('Unknown'), GREY ];
	}
}

function linkState(state) {
	switch (state) {
	case 'established':  return [ _('Up'), GREEN ];
	case 'connect_sent':
	case 'connect_rcvd': return [ _('Connecting'), ORANGE ];
	case 'closing':      return [ _('Closing'), ORANGE ];
	case 'closed':       return [ _('Down'), RED ];
	default:             return [ (state != null) ? String(state) : _('Unknown'), GREY ];
	}
}

function uplinkState(state) {
	switch (state) {
	case 'up':      return [ _('Ready'), GREEN ];
	case 'waiting': return [ _('Waiting'), ORANGE ];
	case 'down':    return [ _('Down'), RED ];
	case 'error':   return [ _('Error'), RED ];
	default:        return [ (state != null) ? String(state) : _('Unknown'), GREY ];
	}
}

/* docs/status.md "control": the client's control connection or the server's listener */
function controlState(state) {
	switch (state) {
	case 'established': return _('Established');
	case 'handshake':   return _('Handshake');
	case 'hello':       return _('Exchanging site details');
	case 'connecting':  return _('Connecting');
	case 'closed':      return _('Closed');
	case 'listening':   return _('Listening');
	default:            return text(state);
	}
}

function roleLabel(role) {
	switch (role) {
	case 'client': return _('Client (connects to the server)');
	case 'server': return _('Server (accepts the client)');
	default:       return text(role);
	}
}

function modeLabel(mode) {
	switch (mode) {
	case 'duplicate': return _('Duplicate: every packet on every subflow');
	case 'aggregate': return _('Aggregate: each packet on one subflow, spread by link quality');
	case 'adaptive':  return _('Adaptive: duplicate over lossy subflows, spread over good ones');
	default:          return text(mode);
	}
}

function modeName(mode) {
	switch (mode) {
	case 'duplicate': return _('Duplicate');
	case 'aggregate': return _('Aggregate');
	case 'adaptive':  return _('Adaptive');
	default:          return text(mode);
	}
}

function testState(state) {
	switch (state) {
	case 'running': return [ _('Running'), ORANGE ];
	case 'done':    return [ _('Finished'), GREEN ];
	case 'failed':  return [ _('Failed'), RED ];
	default:        return [ (state != null) ? String(state) : _('Unknown'), GREY ];
	}
}

function directionLabel(dir) {
	switch (dir) {
	case 'up':   return _('Up: this site \u2192 peer');
	case 'down': return _('Down: peer \u2192 this site');
	default:     return text(dir);
	}
}

/* a count as digits, however large (no 32-bit wrap as with %d) */
function fmtCount(v) {
	return isNum(v) ? String(Math.round(v)) : NONE;
}

function fmtBytes(v) {
	if (!isNum(v))
		return NONE;
	if (Math.abs(v) >= 1e9)
		return _('%.2f GB').format(v / 1e9);
	if (Math.abs(v) >= 1e6)
		return _('%.2f MB').format(v / 1e6);
	if (Math.abs(v) >= 1e3)
		return _('%.1f kB').format(v / 1e3);
	return _('%s B').format(fmtCount(v));
}

/* a unix time in the browser's locale, or null */
function fmtTime(t) {
	if (!isNum(t))
		return null;
	var d = new Date(t * 1000);
	return isNaN(d.getTime()) ? null : d.toLocaleString();
}

/* an age in seconds: "3 s", "4 min", "2 h" */
function fmtAge(s) {
	if (!isNum(s) || s < 0)
		return NONE;
	if (s < 90)
		return _('%d s').format(Math.round(s));
	if (s < 5400)
		return _('%d min').format(Math.round(s / 60));
	return _('%d h').format(Math.round(s / 3600));
}

function fmtDuration(s) {
	return isNum(s) ? '%t'.format(Math.max(0, Math.floor(s))) : NONE;
}

function fmtMs(v) {
	return isNum(v) ? _('%.1f ms').format(v) : NONE;
}

function fmtPct(frac) {
	return (isNum(frac) && isNum(frac * 100)) ? _('%.1f %%').format(frac * 100) : NONE;
}

function fmtRate(bps) {
	if (!isNum(bps))
		return NONE;
	if (bps >= 1e9)
		return _('%.2f Gbit/s').format(bps / 1e9);
	if (bps >= 1e6)
		return _('%.2f Mbit/s').format(bps / 1e6);
	if (bps >= 1e3)
		return _('%.1f kbit/s').format(bps / 1e3);
	return _('%d bit/s').format(Math.round(bps));
}

/* docs/status.md "dataplane": which packet path runs, in words */
function dataPath(cLoops, why) {
	if (cLoops === true)
		return _('compiled (C loops of the package orayboxvpn-fastpath)');

	if (why == null || /^not built\b/.test(String(why)))
		return _('Python only: the optional compiled data path is not installed. Install the package orayboxvpn-fastpath to add it; it carries several times more traffic per CPU second.');

	if (/MPVPN_FASTPATH=0/.test(String(why)))
		return _('Python only: the compiled data path is installed but switched off (MPVPN_FASTPATH=0).');

	return _('Python only: the compiled data path is not in use (%s).').format(String(why));
}

/* The first line of an error: LuCI appends a stack trace to RPC errors. */
function errorLine(err) {
	var msg = (err && err.message != null) ? err.message : err;
	return String(msg).split(/\n/)[0];
}

function explainError(err) {
	var msg = errorLine(err);

	if (/error -32000\b/.test(msg) || /Object not found/.test(msg))
		return _('The orayboxvpn agent is not running: ubus has no "orayboxvpn" object. Start it with "/etc/init.d/orayboxvpn start"; if it stops again, "logread -e orayboxvpn" tells why.');
	if (/error -32002\b/.test(msg))
		return _('Access denied: this login may not read the orayboxvpn status.');
	if (/ubus code 3\b/.test(msg))
		return _('The running agent does not know this request: update the orayboxvpn package.');
	if (/ubus code 7\b/.test(msg) || /timed out/.test(msg))
		return _('The agent did not answer in time: it may be busy or hanging.');

	return _('Cannot read the status from the agent: %s').format(msg);
}

function svgEl(tag, attrs, children) {
	return E(document.createElementNS(SVG_NS, tag), attrs || {}, children || []);
}

/* RTT (blue) and loss (red) over the kept samples, oldest left, newest right. */
function sparkline(points, live) {
	var w = 120, h = 28, step = w / (Math.max(points.length, 2) - 1),
	    maxRtt = 0, maxLoss = 0, lines = [];

	points.forEach(function(p) {
		if (isNum(p.rtt)) maxRtt = Math.max(maxRtt, p.rtt);
		if (isNum(p.loss)) maxLoss = Math.max(maxLoss, p.loss);
	});

	/* one polyline per run of samples: a subflow that was down leaves a gap */
	function polyline(key, top, color) {
		var runs = [ [] ];

		for (var i = 0; i < points.length; i++) {
			var v = points[i][key];

			if (!isNum(v)) {
				if (runs[runs.length - 1].length)
					runs.push([]);
				continue;
			}

			var x = i * step,
			    y = (h - 1) - Math.min(v / top, 1) * (h - 2);

			runs[runs.length - 1].push(x.toFixed(1) + ',' + y.toFixed(1));
		}

		runs.forEach(function(coords) {
			if (coords.length > 1)
				lines.push(svgEl('polyline', {
					'points': coords.join(' '),
					'fill': 'none',
					'stroke': color,
					'stroke-width': '1.5'
				}));
		});
	}

	/* loss scaled to at least 5 %, so a clean link stays a flat line */
	var topLoss = Math.max(maxLoss, 0.05), topRtt = Math.max(maxRtt * 1.25, 1);
	polyline('loss', topLoss, LOSS_COLOR);
	polyline('rtt', topRtt, RTT_COLOR);

	var title = _('Last %d samples, %d s apart: RTT up to %.1f ms, loss up to %.1f %%').format(points.length, POLL_INTERVAL, maxRtt, maxLoss * 100);

	return E('span', { 'class': 'mpvpn-history' }, [ svgEl('svg', {
		'class': 'mpvpn-spark',
		'width': String(w),
		'height': String(h),
		'viewBox': '0 0 ' + w + ' ' + h,
		'role': 'img',
		'aria-label': title
	}, [
		svgEl('title', {}, [ title ]),
		svgEl('rect', { 'x': '0.5', 'y': '0.5', 'width': String(w - 1), 'height': String(h - 1), 'fill': 'none', 'stroke': '#ddd' })
	].concat(lines)), E('br'), E('small', { 'class': 'mpvpn-scale', 'style': 'opacity:.75' }, lines.length ? [
		/* the scale: the top of the box, for each line; the width is the time shown */
		E('span', { 'style': 'color:' + RTT_COLOR }, [ _('RTT 0\u2013%.0f ms').format(topRtt) ]), ', ',
		E('span', { 'style': 'color:' + LOSS_COLOR }, [ _('loss 0\u2013%.0f %%').format(topLoss * 100) ]), ', ',
		_('last %s').format(fmtAge(Math.max(points.length - 1, 0) * POLL_INTERVAL))
	] : [ live ? _('collecting samples\u2026') : _('no figures while the subflow is down') ]) ]);
}

function weightBar(weight) {
	if (!isNum(weight))
		return E('span', [ NONE ]);

	var pc = Math.max(0, Math.min(100, weight * 100));

	/* LuCI themes print a progress bar's title on the bar */
	return E('div', {
		'class': 'cbi-progressbar mpvpn-weight',
		'title': _('%.0f %%').format(pc)
	}, [
		E('div', { 'style': 'width:' + pc.toFixed(1) + '%' })
	]);
}

function small(children) {
	return E('small', { 'style': 'opacity:.75' }, children);
}

/* one line per site session of a hub: name, state, vNIC, LANs, subflows up,
   traffic and what the hub forwarded between it and the other sites */
function siteList(sessions) {
	return E('div', { 'id': 'mpvpn-sites' }, sessions.map(function(s) {
		var peer = isObj(s.peer) ? s.peer : {},
		    vnc = isObj(peer.vnc) ? peer.vnc : {},
		    lans = Array.isArray(peer.lans) ? peer.lans.filter(function(l) { return l != null; }).map(String) : [],
		    links = Array.isArray(s.links) ? s.links.filter(isObj) : [],
		    up = links.filter(function(l) { return l.state == 'established'; }).length,
		    tx = 0, rx = 0,
		    line = [ E('strong', [ text(s.name) ]), ' (' + sessionState(s.state)[0] + ')' ];

		links.forEach(function(l) {
			if (isNum(l.tx_bytes)) tx += l.tx_bytes;
			if (isNum(l.rx_bytes)) rx += l.rx_bytes;
		});
		if (vnc.ip != null)
			line.push(' ', String(vnc.ip));
		if (lans.length)
			line.push(' — ', lans.join(', '));
		line.push(' ', small([ _('%d of %d subflows up').format(up, links.length), ', ',
			_('sent %s, received %s').format(fmtBytes(tx), fmtBytes(rx)) ]));
		if (isObj(s.forwarded)) {
			var f = s.forwarded,
			    fw = [ _('forwarded to other sites %s, from them %s').format(fmtBytes(f.from_bytes), fmtBytes(f.to_bytes)) ];
			if (isNum(f.refused) && f.refused > 0)
				fw.push(', ', _('%s refused (forwarding off)').format(fmtCount(f.refused)));
			if (isNum(f.spoofed) && f.spoofed > 0)
				fw.push(', ', E('span', { 'style': 'color:' + RED }, [ _('%s with a foreign source dropped').format(fmtCount(f.spoofed)) ]));
			line.push(E('br'), small([ E('span', { 'class': 'mpvpn-forwarded' }, fw) ]));
		}
		return E('div', { 'class': 'mpvpn-site' }, line);
	}));
}

return view.extend({
	load: function() {
		return callStatus().then(function(st) {
			return { status: st };
		}, function(err) {
			return { error: err };
		});
	},

	render: function(data) {
		this.history = {};

		this.alertNode = E('div', { 'id': 'mpvpn-alert' });
		this.headerNode = E('div', { 'id': 'mpvpn-session' });
		this.totalsNode = E('div', { 'id': 'mpvpn-counters' });

		this.linksTable = new ui.Table([
			_('Carrier'),
			_('Local \u21c4 remote'),
			_('State'),
			_('RTT'),
			_('Loss'),
			_('Traffic'),
			_('Weight'),
			_('History (RTT blue, loss red)')
		], {
			id: 'mpvpn-links',
			sortable: [ true, true, true, true, true, false, true, false ]
		}, E('em', [ _('Collecting data\u2026') ]));

		this.policiesNode = E('div');
		this.policiesTable = null;
		this.policiesCounters = null;
		this.policiesSection = E('div', { 'class': 'cbi-section', 'id': 'mpvpn-policies', 'style': 'display:none' }, [
			E('h3', [ _('Per-host link policies') ]),
			E('div', { 'class': 'cbi-section-descr' }, [
				_('Traffic of these LAN hosts or subnets uses only the carriers listed; an exclusive policy reserves its carriers for that traffic. The first matching policy applies. "priority": in aggregate and adaptive mode this traffic is sent first when the links are busy, other traffic waits.')
			]),
			this.policiesNode
		]);

		/* a read-only login (rpcd ACL group read only) may not reconnect or test */
		this.readonly = (L.hasViewPermission() === false);
		this.testBusy = false;
		this.testRunning = false;
		this.reachable = false;
		this.testStateNode = E('div', { 'id': 'mpvpn-linktest-state' });
		this.testDuration = E('select', { 'class': 'cbi-input-select', 'id': 'mpvpn-test-duration' },
			TEST_DURATIONS.map(function(d) {
				return E('option', { 'value': String(d), 'selected': (d == TEST_DEFAULT_DURATION) ? 'selected' : null },
					[ _('%d s per phase').format(d) ]);
			}));
		this.testButton = E('button', {
			'class': 'cbi-button cbi-button-action',
			'id': 'mpvpn-test-links',
			'disabled': 'disabled',
			'click': this.handleTestLinks.bind(this)
		}, [ _('Test links') ]);
		this.reconnectButton = E('button', {
			'class': 'cbi-button cbi-button-action',
			'id': 'mpvpn-reconnect',
			'disabled': 'disabled',
			'title': _('Sets up the control connection and the subflows again'),
			'click': ui.createHandlerFn(this, 'handleReconnect')
		}, [ _('Reconnect') ]);
		var readonlyNote = E('em', { 'class': 'mpvpn-readonly' }, [
			_('This login may only read the status: Reconnect and Test links need a login with write access.')
		]);
		this.testTable = new ui.Table([
			_('Links'),
			_('Direction'),
			_('Throughput'),
			_('RTT'),
			_('Loss'),
			_('Packets')
		], {
			id: 'mpvpn-linktest'
		}, E('em', [ _('No results yet.') ]));
		this.testTableNode = E('div', { 'style': 'display:none' }, [ this.testTable.render() ]);

		var node = E('div', { 'class': 'cbi-map', 'id': 'mpvpn-status' }, [
			E('h2', [ _('Multipath VPN') ]),
			E('div', { 'class': 'cbi-map-descr' }, [
				_('Every subflow is one carrier (telecom, unicom, mobile, ...) between this site and the peer site. The page refreshes every few seconds.')
			]),
			this.alertNode,
			E('div', { 'class': 'cbi-section' }, [
				E('h3', [ _('Session') ]),
				this.headerNode,
				E('div', { 'class': 'right', 'style': 'margin-top:.5em' }, [
					this.readonly ? readonlyNote : this.reconnectButton
				])
			]),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', [ _('Subflows') ]),
				this.linksTable.render()
			]),
			E('div', { 'class': 'cbi-section', 'id': 'mpvpn-linktest-section' }, [
				E('h3', [ _('Link test') ]),
				E('div', { 'class': 'cbi-section-descr' }, [
					_('Measures the throughput, RTT and loss of each carrier alone and of all of them together, in both directions, one phase after the other. Each phase fills the links under test, so traffic through the tunnel may slow down while it runs.')
				]),
				E('div', { 'style': 'margin-bottom:.5em' }, this.readonly
					? [ readonlyNote.cloneNode(true) ]
					: [ this.testDuration, ' ', this.testButton ]),
				this.testStateNode,
				this.testTableNode
			]),
			this.policiesSection,
			E('div', { 'class': 'cbi-section' }, [
				E('h3', [ _('Totals') ]),
				this.totalsNode
			])
		]);

		this.update(data);
		poll.add(this.refresh.bind(this), POLL_INTERVAL);

		return node;
	},

	refresh: function() {
		var self = this;

		return callStatus().then(function(st) {
			self.update({ status: st });
		}, function(err) {
			self.update({ error: err });
		});
	},

	update: function(data) {
		var st = data ? data.status : null;

		if ((data && data.error) || !isObj(st) || st.state == null) {
			var why = (data && data.error) ? explainError(data.error)
				: _('The agent answered without a status document: it may still be starting.');

			dom.content(this.alertNode, E('div', { 'class': 'alert-message warning' }, [
				E('strong', [ _('No status from the agent.') ]), ' ', why
			]));
			dom.content(this.headerNode, E('em', [ _('Not available.') ]));
			dom.content(this.totalsNode, E('em', [ _('Not available.') ]));
			this.linksTable.update([], E('em', [ _('No data: the agent is not reachable.') ]));
			this.history = {};
			this.reachable = false;
			this.updatePolicies([], null);
			dom.content(this.testStateNode, E('em', [ _('Not available.') ]));
			this.testRunning = false;
			this.updateTestButton();
			return;
		}

		this.reachable = true;

		if (st.state == 'error' && st.last_error != null)
			dom.content(this.alertNode, E('div', { 'class': 'alert-message danger' }, [
				E('strong', [ _('The agent cannot run:') ]), ' ', String(st.last_error)
			]));
		else
			dom.content(this.alertNode, []);

		dom.content(this.headerNode, this.renderHeader(st));
		this.linksTable.update(this.linkRows(st), E('em', [ _('No subflows: the tunnel is not set up yet.') ]));
		dom.content(this.totalsNode, this.renderCounters(st.counters));
		this.updatePolicies(Array.isArray(st.policies) ? st.policies.filter(isObj) : [], st.mode);
		this.updateLinkTest(isObj(st.link_test) ? st.link_test : null);
	},

	/* numeric per-policy counters: top-level numbers that are no policy option, and policy.counters */
	policyCounters: function(p) {
		var out = [];

		Object.keys(p).forEach(function(k) {
			if (!POLICY_FIELDS[k] && isNum(p[k]))
				out.push([ k, p[k] ]);
		});

		if (isObj(p.counters))
			Object.keys(p.counters).forEach(function(k) {
				if (isNum(p.counters[k]))
					out.push([ k, p.counters[k] ]);
			});

		return out;
	},

	updatePolicies: function(policies, tunnelMode) {
		var self = this,
		    counted = policies.some(function(p) { return self.policyCounters(p).length > 0; });

		this.policiesSection.style.display = policies.length ? '' : 'none';

		/* the Traffic column only when the agent reports per-policy counters */
		if (this.policiesTable == null || this.policiesCounters !== counted) {
			var captions = [ _('Policy'), _('Match'), _('Carriers'), _('Mode') ];

			if (counted)
				captions.push(_('Traffic'));

			this.policiesTable = new ui.Table(captions, { id: 'mpvpn-policy-table' },
				E('em', [ _('No policies.') ]));
			this.policiesCounters = counted;
			dom.content(this.policiesNode, this.policiesTable.render());
		}

		this.policiesTable.update(policies.map(function(p) {
			var match = [ text(p.src), ' \u2192 ', (p.dst != null) ? String(p.dst) : _('any destination') ],
			    carriers = [];

			if (Array.isArray(p.carriers) && p.carriers.length)
				carriers.push(p.carriers.filter(function(c) { return c != null; }).map(String).join(', '));
			else if (p.carriers != null && !Array.isArray(p.carriers))
				carriers.push(String(p.carriers));
			else
				carriers.push(E('em', [ _('any carrier') ]));

			if (p.exclusive === true)
				carriers.push(' ', E('span', {
					'class': 'mpvpn-exclusive',
					'title': _('Other traffic may not use these carriers')
				}, [ badge(_('exclusive'), ORANGE, 'exclusive') ]));

			var mode = (p.mode != null) ? modeName(p.mode)
				: E('em', [ _('as the tunnel (%s)').format(modeName(tunnelMode)) ]);

			var row = [
				E('strong', [ text(p.name) ]),
				E('span', { 'class': 'mpvpn-match' }, match),
				E('span', { 'class': 'mpvpn-carriers' }, carriers),
				E('span', { 'class': 'mpvpn-mode', 'data-mode': (p.mode != null) ? String(p.mode) : null }, [
					mode,
					(p.priority === true) ? E('span', {
						'class': 'mpvpn-priority',
						'title': _('Sent before all other traffic when the links are busy (aggregate and adaptive modes)')
					}, [ ' ', badge(_('priority'), GREEN, 'priority') ]) : ''
				])
			];

			if (counted)
				row.push(E('span', { 'class': 'mpvpn-policy-counters' }, self.policyCounters(p).map(function(c) {
					var v = /bytes$/.test(c[0]) ? fmtBytes(c[1]) : fmtCount(c[1]);
					return E('div', { 'data-counter': c[0] }, [ POLICY_COUNTERS[c[0]] || c[0], ': ', v ]);
				})));

			return row;
		}), E('em', [ _('No policies.') ]));
	},

	updateTestButton: function() {
		var busy = this.testBusy || this.testRunning;

		/* Reconnect needs a running agent; ui.createHandlerFn re-enables it after a press */
		if (!this.reconnectButton.classList.contains('spinning'))
			this.reconnectButton.disabled = !this.reachable;
		this.testButton.disabled = busy || !this.reachable;
		this.testDuration.disabled = busy;
		this.testButton.classList.toggle('spinning', busy);
	},

	updateLinkTest: function(lt) {
		this.testRunning = (lt != null && lt.state == 'running');
		this.updateTestButton();

		if (lt == null) {
			dom.content(this.testStateNode, E('em', [ _('No link test has run since the agent started.') ]));
			this.testTableNode.style.display = 'none';
			return;
		}

		var ts = testState(lt.state),
		    line = [ badge(ts[0], ts[1], lt.state) ],
		    started = fmtTime(lt.started);

		if (lt.state == 'running') {
			var known = isNum(lt.phase) && isNum(lt.phases) && lt.phase >= 0 && lt.phases > 0;

			line.push(' ', E('span', { 'id': 'mpvpn-linktest-progress' }, [
				known ? _('phase %s of %s').format(fmtCount(lt.phase + 1), fmtCount(lt.phases))
				      : _('starting\u2026')
			]));

			if (known) {
				var pc = Math.max(0, Math.min(100, lt.phase / lt.phases * 100));

				line.push(E('div', {
					'class': 'cbi-progressbar',
					'title': _('%.0f %%').format(pc),
					'style': 'display:inline-block;vertical-align:middle;margin-left:1em'
				}, [ E('div', { 'style': 'width:' + pc.toFixed(1) + '%' }) ]));
			}
		}
		else if (isNum(lt.phases)) {
			line.push(' ', small([ _('%s phases').format(fmtCount(lt.phases)) ]));
		}

		if (lt.peer != null)  /* the agent may name the peer site (several clients on a server) */
			line.push(' ', small([ _('with %s').format(String(lt.peer)) ]));
		if (started != null)
			line.push(' ', small([ _('started %s').format(started) ]));

		var nodes = [ E('div', line) ];

		if (lt.error != null)
			nodes.push(E('div', { 'class': 'alert-message danger', 'id': 'mpvpn-linktest-error', 'style': 'margin-top:.5em' }, [
				E('strong', [ _('The link test failed:') ]), ' ', String(lt.error)
			]));

		dom.content(this.testStateNode, nodes);

		var results = Array.isArray(lt.results) ? lt.results.filter(isObj) : [];

		this.testTableNode.style.display = '';
		this.testTable.update(results.map(function(r) {
			var name = [ E('strong', [ text(r.name) ]) ],
			    members = Array.isArray(r.members) ? r.members.filter(isNum) : [];

			if (members.length > 1)
				name.push(E('br'), small([ _('%s subflows').format(fmtCount(members.length)) ]));

			var rate = [ isNum(r.mbps) ? fmtRate(r.mbps * 1e6) : NONE ];
			if (isNum(r.goodput_mbps) && isNum(r.goodput_mbps * 1e6))  /* optional: what arrived of the load */
				rate.push(E('br'), small([ _('goodput %s').format(fmtRate(r.goodput_mbps * 1e6)) ]));

			return [
				E('span', name),
				E('span', { 'data-direction': (r.direction != null) ? String(r.direction) : null }, [ directionLabel(r.direction) ]),
				[ isNum(r.mbps) ? r.mbps : -1, E('span', { 'class': 'mpvpn-mbps' }, rate) ],
				[ isNum(r.rtt_ms) ? r.rtt_ms : -1, E('span', { 'class': 'mpvpn-rtt' }, [ fmtMs(r.rtt_ms) ]) ],
				[ isNum(r.loss) ? r.loss : -1, E('span', { 'class': 'mpvpn-loss' }, [ fmtPct(r.loss) ]) ],
				E('span', { 'class': 'mpvpn-volume' }, [
					_('%s packets').format(fmtCount(r.packets)), E('br'), small([ fmtBytes(r.bytes) ])
				])
			];
		}), E('em', [ (lt.state == 'running') ? _('The first phase is still running.') : _('No results.') ]));
	},

	renderHeader: function(st) {
		var ss = sessionState(st.state),
		    peer = isObj(st.peer) ? st.peer : {},
		    vnc = isObj(st.vnc) ? st.vnc : {},
		    ctl = isObj(st.control) ? st.control : null,
		    rows = [];

		rows.push([ _('State'), E('span', [
			badge(ss[0], ss[1], st.state), ' ', text(st.state_text)
		]) ]);

		if (st.last_error != null)
			rows.push([ _('Last error'), E('span', { 'style': 'color:' + RED }, [ String(st.last_error) ]) ]);

		rows.push([ _('Role'), roleLabel(st.role) ]);
		rows.push([ _('This site'), text(st.name) ]);
		rows.push([ _('Peer site'), text(peer.name) ]);
		rows.push([ _('Mode'), modeLabel(st.mode) ]);

		var vnic = [ text(vnc.ifname) ];
		if (vnc.address != null)
			vnic.push(' ', String(vnc.address) + (vnc.netmask != null ? '/' + vnc.netmask : ''));
		if (isNum(vnc.mtu))
			vnic.push(' ', _('MTU %d').format(vnc.mtu));
		rows.push([ _('Tunnel interface'), E('span', vnic) ]);

		if (isObj(st.dataplane)) {
			/* docs/status.md "dataplane": how packets move */
			var dp = st.dataplane,
			    path = [ E('span', { 'class': 'mpvpn-datapath', 'title': (dp.c_loops_off_why != null) ? String(dp.c_loops_off_why) : null }, [
			    	dataPath(dp.c_loops, dp.c_loops_off_why)
			    ]) ];
			if (dp.tun_offload != null)
				path.push(E('br'), _('tun offload %s').format(String(dp.tun_offload)));
			if (dp.tun_offload_error != null)
				path.push(' ', small([ '(' + String(dp.tun_offload_error) + ')' ]));
			rows.push([ _('Data path'), E('span', path) ]);
		}

		var routes = Array.isArray(st.routes) ? st.routes.filter(function(r) { return r != null; }) : [];
		rows.push([ _('Routes into the tunnel'), routes.length ? routes.join(', ') : E('em', [ _('none') ]) ]);

		if (ctl) {
			var c = [ E('span', { 'data-state': (ctl.state != null) ? String(ctl.state) : null }, [ controlState(ctl.state) ]) ],
			    other = (ctl.server != null) ? ctl.server : ctl.peer;  /* docs/status.md: server; agent 0.1: peer */
			if (other != null)
				c.push(' ', _('with %s').format(String(other)));
			if (isNum(ctl.rekeys))
				c.push(' ', small([ _('(%d rekeys)').format(ctl.rekeys) ]));
			rows.push([ _('Control connection'), E('span', c) ]);
		}

		var links = Array.isArray(st.links) ? st.links.filter(isObj) : [];

		if (Array.isArray(st.uplinks) && st.uplinks.length)
			rows.push([ _('Uplinks'), E('div', st.uplinks.filter(isObj).map(function(u) {
				var us = uplinkState(u.state),
				    line = [ badge(us[0], us[1], u.state), ' ', text(u.name) ];

				if (u.type != null && u.type != u.name)
					line.push(' (' + u.type + ')');
				if (u.bind_ip != null)
					line.push(' ', String(u.bind_ip) + (isNum(u.port) ? ':' + u.port : ''));
				if (u.error != null)
					line.push(' ', E('span', { 'style': 'color:' + RED }, [ String(u.error) ]));
				/* docs/status.md uplinks[].public / nat: what STUN learnt (null without base.stun) */
				var natWords = {
					'none': _('public address, no NAT'),
					'endpoint-independent': _('behind NAT: %s (hole punching works)'),
					'endpoint-dependent': _('behind symmetric NAT: %s (needs a relay when the other end is behind NAT too)'),
					'unknown': _('NAT kind not known yet')
				};
				if (u.nat != null && natWords[u.nat] != null)
					line.push(E('br'), small([ E('span', { 'class': 'mpvpn-nat' }, [
						(u.nat == 'endpoint-independent' || u.nat == 'endpoint-dependent')
							? natWords[u.nat].format(u.public != null ? String(u.public) : '?')
							: natWords[u.nat]
					]) ]));
				/* docs/status.md uplinks[].relay: a relay in use that failed says why */
				if (isObj(u.relay) && u.relay.started && u.relay.state != 'ready' && u.relay.last_error != null)
					line.push(' ', E('span', { 'class': 'mpvpn-relay-error', 'style': 'color:' + RED }, [
						_('relay: %s').format(String(u.relay.last_error))
					]));

				/* "up" is the local side only: the socket is bound to the uplink's address */
				var down = (u.state == 'up' && u.name != null) ? links.filter(function(l) {
					return l.name == u.name && l.state != 'established';
				}) : [];
				if (down.length)
					line.push(' ', small([ E('span', { 'class': 'mpvpn-uplink-note' }, [
						_('its socket is ready, but its subflow to the peer is down (see Subflows): the carrier or the peer\'s uplink does not answer')
					]) ]));

				return E('div', line);
			})) ]);

		/* direct sessions with other sites are listed under "Direct paths", not as connected sites */
		var sessions = Array.isArray(st.sessions) ? st.sessions.filter(function(s) {
			return isObj(s) && s.direct !== true;
		}) : [];
		if (sessions.length > 1 || sessions.some(function(s) { return isObj(s.forwarded); }))
			rows.push([ _('Connected sites'), siteList(sessions) ]);

		/* a client of a hub that forwards between sites (docs/status.md sessions[].via) */
		var via = [], refused = [];
		sessions.forEach(function(s) {
			if (Array.isArray(s.via))
				via = via.concat(s.via.filter(isObj));
			if (Array.isArray(s.via_refused))
				refused = refused.concat(s.via_refused.filter(isObj));
		});
		if (via.length || refused.length)
			rows.push([ _('Other sites'), E('div', { 'id': 'mpvpn-via' }, via.map(function(v) {
				var lans = Array.isArray(v.lans) ? v.lans.filter(function(l) { return l != null; }).map(String) : [];
				return E('div', { 'class': 'mpvpn-via-site' }, [
					E('strong', [ text(v.name) ]), ' ', text(v.vnc),
					lans.length ? ' — ' + lans.join(', ') : '',
					' ', small([ (v.path == 'hub') ? _('through the hub')
						: (v.path == 'direct') ? _('direct (the hub stands by)') : text(v.path) ])
				]);
			}).concat(refused.map(function(r) {
				return E('div', { 'class': 'mpvpn-via-refused', 'style': 'color:' + ORANGE }, [
					E('strong', [ text(r.name) ]), ' ', _('offered by the hub but not routed here: %s').format(text(r.why))
				]);
			}))) ]);

		/* direct paths between sites (docs/status.md direct): a site's peers, a hub's pairs */
		var direct = isObj(st.direct) ? st.direct : {},
		    peers = Array.isArray(direct.peers) ? direct.peers.filter(isObj) : [],
		    pairs = Array.isArray(direct.pairs) ? direct.pairs.filter(isObj) : [];
		var phaseWords = {
			'handshake': _('through the hub: the two sites are exchanging keys'),
			'up': _('direct: a subflow between the two sites is up'),
			'down': _('through the hub: no direct subflow is up')
		};
		var pins = Array.isArray(direct.pins) ? direct.pins.filter(isObj) : [];
		if (typeof(direct.key) == 'string')
			rows.push([ _('Direct key of this site'), E('span', { 'id': 'mpvpn-direct-key' }, [
				E('code', [ direct.key ]), ' ',
				small([ direct.key_static ? _('static: other sites may pin it')
					: _('made at this start: set a direct key so that other sites can pin it') ]) ]) ]);
		if (pins.length)
			rows.push([ _('Pinned direct keys'), E('div', { 'id': 'mpvpn-direct-pins' }, pins.map(function(p) {
				var bad = (p.state == 'mismatch');
				var line = [ badge(bad ? _('key mismatch') : (p.state == 'matched') ? _('matched') : _('unused'),
					bad ? RED : (p.state == 'matched') ? GREEN : ORANGE, p.state), ' ', E('strong', [ text(p.name) ]) ];
				if (bad)
					line.push(' ', small([ _('the hub offered another key %d times (last: %s); refused, the traffic stays through the hub')
						.format(isNum(p.mismatches) ? p.mismatches : 0, text(p.last_key)) ]));
				return E('div', { 'class': 'mpvpn-direct-pin' }, line);
			})) ]);
		if (peers.length || pairs.length)
			rows.push([ _('Direct paths'), E('div', { 'id': 'mpvpn-direct' }, peers.map(function(p) {
				var up = (p.state == 'direct');
				var line = [ badge(up ? _('direct') : _('via hub'), up ? GREEN : ORANGE, p.state), ' ',
					E('strong', [ text(p.name) ]), ' ',
					small([ phaseWords[p.phase] != null ? phaseWords[p.phase] : text(p.phase) ]) ];
				if (isNum(p.since))
					line.push(' ', small([ _('for %s').format(fmtDuration(p.since)) ]));
				if (isNum(p.downs) && p.downs > 0)
					line.push(' ', small([ _('back to the hub %d times').format(p.downs) ]));
				return E('div', { 'class': 'mpvpn-direct-peer' }, line);
			}).concat(pairs.map(function(p) {
				var sites = Array.isArray(p.sites) ? p.sites.map(text) : [];
				return E('div', { 'class': 'mpvpn-direct-pair' }, [
					E('strong', [ sites.join(' \u2194 ') ]), ' ',
					small([ (p.state != 'keyed') ? ((p.state == 'offered') ? _('offered: the two sites are exchanging keys') : text(p.state))
						: (p.path == 'direct') ? _('keyed; direct (inferred: this hub forwards nothing between them)')
						: _('keyed; via hub (this hub still forwards between them)') ])
				]);
			}))) ]);

		var up = [ fmtDuration(st.uptime) ];
		if (isNum(st.since))
			up.push(' ', small([ _('in this state for %s').format(fmtDuration(st.since)) ]));
		rows.push([ _('Agent uptime'), E('span', up) ]);

		if (st.version != null)
			rows.push([ _('Agent version'), String(st.version) ]);

		return E('table', { 'class': 'table', 'id': 'mpvpn-header' }, rows.map(function(r) {
			return E('tr', { 'class': 'tr' }, [
				E('td', { 'class': 'td left', 'width': '33%' }, [ r[0] ]),
				E('td', { 'class': 'td left' }, [ r[1] ])
			]);
		}));
	},

	linkRows: function(st) {
		var links = Array.isArray(st.links) ? st.links.filter(isObj) : [],
		    now = isNum(st.uptime) ? st.uptime : Date.now() / 1000,
		    peers = {}, seen = {}, self = this;

		links.forEach(function(l) { peers[String(l.peer)] = true; });

		var multiPeer = Object.keys(peers).length > 1;

		var rows = links.map(function(l, i) {
			var key = [ l.session_id, l.member != null ? l.member : 'i' + i, l.name ].join('/'),
			    h = self.history[key] || (self.history[key] = { points: [], prev: null, rx: null, tx: null });

			seen[key] = true;

			/*
			 * rx/tx rate from the byte counters since the previous sample; a
			 * sample closer than MIN_SAMPLE to the previous one (LuCI runs a
			 * new poll function at once, right after load()) is only shown
			 */
			var dt = h.prev ? now - h.prev.t : null;

			if (dt != null && dt >= MIN_SAMPLE) {
				h.rx = (isNum(l.rx_bytes) && isNum(h.prev.rx) && l.rx_bytes >= h.prev.rx) ? (l.rx_bytes - h.prev.rx) * 8 / dt : null;
				h.tx = (isNum(l.tx_bytes) && isNum(h.prev.tx) && l.tx_bytes >= h.prev.tx) ? (l.tx_bytes - h.prev.tx) * 8 / dt : null;
			}
			else if (dt != null && dt < 0) {
				h.rx = h.tx = null;  /* the agent restarted */
				h.points = [];
				h.prev = null;
			}

			if (!h.prev || dt >= MIN_SAMPLE) {
				h.prev = { t: now, rx: l.rx_bytes, tx: l.tx_bytes };
				/* a subflow that is not up has no new figures: a gap in its history */
				h.points.push((l.state == 'established') ? { rtt: l.rtt_ms, loss: l.loss } : { rtt: null, loss: null });
				if (h.points.length > HISTORY_POINTS)
					h.points.splice(0, h.points.length - HISTORY_POINTS);
			}

			var ls = linkState(l.state),
			    carrier = [ E('strong', [ text(l.name) ]) ];

			if (l.type != null && l.type != l.name)
				carrier.push(E('br'), small([ String(l.type) ]));
			if (multiPeer && l.peer != null)
				carrier.push(E('br'), small([ _('to %s').format(String(l.peer)) ]));
			/* docs/status.md links[].path: a subflow that NAT hole punching opened */
			if (l.path == 'punched')
				carrier.push(E('br'), small([ E('span', { 'class': 'mpvpn-punched' }, [
					_('through NAT (hole punched), to %s').format(l.remote != null ? String(l.remote) : '?')
				]) ]));
			/* docs/status.md links[].path: a subflow carried by a TURN relay, and why */
			if (l.path == 'relayed' && l.relay != null)
				carrier.push(E('br'), small([ E('span', { 'class': 'mpvpn-relayed' }, [
					(l.relay_reason != null)
						? _('via relay %s: %s').format(String(l.relay), String(l.relay_reason))
						: _('via relay %s').format(String(l.relay))
				]) ]));

			var stateCell = [ badge(ls[0], ls[1], l.state) ];
			if (l.state != 'established' && l.last_down_reason)
				stateCell.push(E('br'), small([ String(l.last_down_reason) ]));

			/*
			 * docs/status.md: loss is the loss of what we send (reported by the
			 * peer), loss_in of what we receive.  A subflow that is not up keeps
			 * its last figures: show them as old, with their age (last_rx_age:
			 * seconds since the peer's last datagram on it)
			 */
			var live = (l.state == 'established'),
			    stale = live ? null : E('small', { 'class': 'mpvpn-stale' }, [
			    	isNum(l.last_rx_age) ? _('last heard %s ago').format(fmtAge(l.last_rx_age)) : _('never heard')
			    ]);

			var rtt = [ E('span', { 'style': live ? null : 'opacity:.5' }, [ fmtMs(l.rtt_ms) ]) ];
			if (live && isNum(l.rtt_ms) && isNum(l.rttvar_ms))
				rtt.push(E('br'), small([ _('\u00b1 %.1f ms').format(l.rttvar_ms) ]));
			if (!live)
				rtt.push(E('br'), stale);

			var loss = [ E('span', { 'style': live ? null : 'opacity:.5' }, [ _('%s outgoing').format(fmtPct(l.loss)) ]) ];
			if (isNum(l.loss_in))
				loss.push(E('br'), small([ _('%s incoming').format(fmtPct(l.loss_in)) ]));
			if (!live)
				loss.push(E('br'), stale.cloneNode(true));

			return [
				[ text(l.name), E('span', carrier) ],
				E('span', [ text(l.local), ' \u21c4 ', text(l.remote) ]),
				[ String(l.state), E('span', stateCell) ],
				[ isNum(l.rtt_ms) ? l.rtt_ms : -1, E('span', { 'class': 'mpvpn-rtt' }, rtt) ],
				[ isNum(l.loss) ? l.loss : -1, E('span', { 'class': 'mpvpn-loss' }, loss) ],
				E('span', { 'class': 'mpvpn-rate' }, [
					_('rx %s').format(fmtRate(h.rx)), E('br'), _('tx %s').format(fmtRate(h.tx))
				]),
				[ isNum(l.weight) ? l.weight : -1, weightBar(l.weight) ],
				sparkline(h.points, live)
			];
		});

		/* forget subflows that went away */
		Object.keys(this.history).forEach(function(key) {
			if (!seen[key])
				delete self.history[key];
		});

		return rows;
	},

	renderCounters: function(counters) {
		if (!isObj(counters))
			return E('em', [ _('No counters reported.') ]);

		var cells = COUNTERS.filter(function(c) { return c[0] in counters; }).map(function(c) {
			var v = counters[c[0]],
			    alarm = ALARM_COUNTERS[c[0]] && isNum(v) && v > 0;

			return [
				E('td', { 'class': 'td left', 'width': '35%' }, [ c[1] ]),
				E('td', {
					'class': 'td left',
					'width': '15%',
					'data-counter': c[0],
					'style': alarm ? 'color:' + RED + ';font-weight:bold' : null
				}, [ isNum(v) ? String(v) : NONE ])
			];
		});

		/* two counters per row */
		var rows = [];
		for (var i = 0; i < cells.length; i += 2)
			rows.push(E('tr', { 'class': 'tr' }, cells[i].concat(cells[i + 1] || [])));

		return E('table', { 'class': 'table', 'id': 'mpvpn-totals' }, rows);
	},

	handleReconnect: function(ev) {
		var self = this;

		if (!window.confirm(_('Reconnect now? The tunnel stops carrying traffic for a moment while the control connection and the subflows are set up again.')))
			return;

		return callReconnect().then(function() {
			ui.addNotification(null, E('p', [
				_('Reconnect requested: the agent sets up the control connection and the subflows again.')
			]), 'info');
			return self.refresh();
		}, function(err) {
			ui.addNotification(null, E('p', [
				_('Reconnect failed: %s').format(errorLine(err))
			]), 'danger');
		});
	},

	handleTestLinks: function(ev) {
		var self = this,
		    duration = parseInt(this.testDuration.value, 10);

		if (this.testBusy || this.testRunning)
			return;

		if (!(duration >= 1 && duration <= 10))
			duration = TEST_DEFAULT_DURATION;

		if (!window.confirm(_('Test the links now? Each phase fills the links under test for %d seconds, so traffic through the tunnel may slow down meanwhile.').format(duration)))
			return;

		this.testBusy = true;
		this.updateTestButton();

		return callTestLinks(duration).then(function(res) {
			if (res.error != null || res.started !== true)
				ui.addNotification(null, E('p', [
					_('The link test did not start: %s').format((res.error != null) ? String(res.error) : _('no answer from the agent'))
				]), 'danger');

			return self.refresh();
		}, function(err) {
			var msg = errorLine(err);

			ui.addNotification(null, E('p', [
				/ubus code 3\b/.test(msg)
					? _('The running agent cannot test links: update the orayboxvpn package.')
					: _('The link test did not start: %s').format(msg)
			]), 'danger');
		}).finally(function() {
			self.testBusy = false;
			self.updateTestButton();
		});
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
