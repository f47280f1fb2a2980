'use strict';
'require view';
'require form';
'require tools.widgets as widgets';

/*
 * Editor for /etc/config/orayboxvpn.  The options, their defaults and their
 * checks follow mpvpn.agent.config.OPTIONS (docs/config.md); `mpvpn check` on the
 * router remains the complete check, including the rules across sections.
 */

var PSK_BYTES = 32;

/* 32 random bytes from the browser's CSPRNG, base64 (what `head -c 32 /dev/urandom | base64` gives) */
function generatePsk() {
	var bytes = new Uint8Array(PSK_BYTES), bin = '';

	window.crypto.getRandomValues(bytes);

	for (var i = 0; i < bytes.length; i++)
		bin += String.fromCharCode(bytes[i]);

	return window.btoa(bin);
}

function validatePsk(section_id, value) {
	if (value == null || value === '')
		return true;

	if (!/^[A-Za-z0-9+\/]{43}=$/.test(value))
		return _('Expecting exactly 32 bytes in base64: 44 characters ending in "=". Use "Generate" to make one.');

	if (/^A{43}=$/.test(value))
		return _('The key is all zero bytes: use a random key.');

	return true;
}

/* base.direct_peer_key: "site name=public key" (mpvpn.agent.config._direct_pins) */
function validatePin(section_id, value) {
	if (value == null || value === '')
		return true;

	var m = /^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})=(.*)$/.exec(value);
	if (!m)
		return _('Expecting "site name=public key", e.g. branch-c=BASE64.');

	return validatePsk(section_id, m[2]);
}

var IPV4_RE = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;
var HOSTNAME_RE = /^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

function isIPv6(s) {
	var halves = String(s).split('::'), groups = [];

	if (halves.length > 2)
		return false;

	for (var h = 0; h < halves.length; h++) {
		var parts = (halves[h] === '') ? [] : halves[h].split(':');

		for (var i = 0; i < parts.length; i++) {
			/* an embedded IPv4 address may end the last half and counts as two groups */
			if (h == halves.length - 1 && i == parts.length - 1 && IPV4_RE.test(parts[i]))
				groups.push('0', '0');
			else if (/^[0-9A-Fa-f]{1,4}$/.test(parts[i]))
				groups.push(parts[i]);
			else
				return false;
		}
	}

	return (halves.length == 2) ? groups.length < 8 : groups.length == 8;
}

function validPort(s) {
	return /^[0-9]{1,5}$/.test(s) && +s >= 1 && +s <= 65535;
}

/*
 * A list of sections of one type (uplinks, sites, policies, relays) as a
 * table, each row with its Enabled flag first.  `named`: rows have names
 * (section names the agent shows); `ordered`: the order matters (the first
 * matching policy, the first relay) and rows can be dragged.
 */
function listSection(m, type, title, description, named, ordered) {
	var s = m.section(form.GridSection, type, title, description);
	s.anonymous = !named;
	s.addremove = true;
	if (ordered)
		s.sortable = true;
	s.nodescriptions = true;

	var o = s.option(form.Flag, 'enabled', _('Enabled'));
	o.default = '1';
	o.editable = true;
	return s;
}

/* host:port, [v6addr]:port or a host alone (port 7000), as mpvpn.agent.config.parse_hostport */
function checkHostPort(value, allowName) {
	var s = String(value).trim(), host, port = null, m;

	if (s === '')
		return true;

	if ((m = /^\[([^\]]*)\](?::(.*))?$/.exec(s)) != null) {
		if (!isIPv6(m[1]))
			return _('Expecting an IPv6 address inside the brackets');
		if (m[2] != null && !validPort(m[2]))
			return _('Expecting a port from 1 to 65535 after the colon');
		return true;
	}

	if (s.split(':').length > 2)
		return _('Write an IPv6 address as [address]:port');

	m = s.split(':');
	host = m[0];
	if (m.length == 2)
		port = m[1];

	if (port != null && !validPort(port))
		return _('Expecting a port from 1 to 65535 after the colon');

	if (IPV4_RE.test(host))
		return true;

	if (!allowName)
		return _('Expecting an IP address with an optional port, e.g. 0.0.0.0:7000 or [::]:7000');

	if (!HOSTNAME_RE.test(host) || /^[0-9.]+$/.test(host))
		return _('Expecting a host name or IP address with an optional port, e.g. 203.0.113.10:7000');

	return true;
}

/* dotted netmask or prefix length, /8 to /30 (a /30 holds both ends) */
function netmaskPrefix(value) {
	var s = String(value).replace(/^\//, ''), m, n;

	if (/^[0-9]{1,2}$/.test(s))
		return +s;

	if (!IPV4_RE.test(s))
		return null;

	m = s.split('.').reduce(function(acc, o) { return acc * 256 + (+o); }, 0);
	n = 0;
	while (n < 32 && Math.floor(m / Math.pow(2, 31 - n)) % 2 == 1)
		n++;

	/* the remaining bits must all be zero */
	return (m % Math.pow(2, 32 - n) == 0) ? n : null;
}

/* A carrier type word, as the agent reads smpu.type and policy.carrier. */
function validCarrier(value) {
	return /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$/.test(value);
}

/*
 * Leave an option out of the file while it holds its default, so that the
 * file keeps only what the admin chose and a later change of a default
 * reaches it: form.Flag does that by itself (rmempty), other widgets write
 * any value that differs from the file's, the default included.
 */
function implicitDefault(o) {
	o.write = function(section_id, value) {
		if (value == this.default)
			return this.remove(section_id);

		return form.AbstractValue.prototype.write.apply(this, [ section_id, value ]);
	};

	return o;
}

/* base.workers: auto, or a whole number 1 to 64 (empty: 1) */
function validateWorkers(section_id, value) {
	if (value == null || value === '' || /^auto$/i.test(value))
		return true;
	if (/^[0-9]{1,2}$/.test(value) && +value >= 1 && +value <= 64)
		return true;
	return _('Expecting auto or a whole number from 1 to 64');
}

/* a TURN relay: host:port (port 3478 when left out); not 0.0.0.0/:: or multicast */
function validateRelayAddress(section_id, value) {
	var r = checkHostPort(value, true), host;

	if (r !== true)
		return r;

	if (String(value).trim() === '')
		return _('Required: the relay\'s address, e.g. 203.0.113.7:3478');

	host = String(value).trim();
	host = (host.charAt(0) == '[') ? host.replace(/^\[([^\]]*)\].*$/, '$1') : host.replace(/:.*$/, '');
	if (host == '0.0.0.0' || host == '::' || /^(22[4-9]|23[0-9])\./.test(host) || /^ff/i.test(host))
		return _('Expecting the address of a relay server');

	return true;
}

/* a TURN user name or password: printable ASCII, at most 128 characters */
function validateCredential(section_id, value) {
	if (value == null || value === '')
		return _('Required: the relay\'s user name and password');

	if (String(value).trim() === '')
		return _('Expecting more than spaces');

	if (value.length > 128)
		return _('At most 128 characters');

	if (!/^[\x20-\x7e]+$/.test(value))
		return _('Only printable ASCII characters (no accents)');

	return true;
}

function validIfname(value) {
	return value.length > 0 && value.length < 16 && value != '.' && value != '..' && !/[\/:\s]/.test(value);
}

return view.extend({
	render: function() {
		var m, s, o;

		m = new form.Map('orayboxvpn', _('Multipath VPN'),
			_('Joins this site to the peer site over several carriers at once. Both sites need the same pre-shared key and uplinks of matching carrier types. Run "mpvpn check" on the router for a complete check of the configuration.') + ' ' +
			_('Save & Apply takes effect at once: the running agent re-reads its configuration. The log level, the keepalive settings, the longest reorder wait and MSS clamping change without interrupting the tunnel; a change of role, keys, addresses, LAN subnets, the tunnel interface, the uplinks, the mode, the reorder buffer size or the MTU sets the sessions up again, so the tunnel drops for a moment. A configuration with errors is refused and the agent keeps running with the previous one (see its status).'));

		/* --- config base 'base' ------------------------------------------------ */

		s = m.section(form.NamedSection, 'base', 'base', _('General settings'));
		s.addremove = false;
		s.tab('general', _('General'));
		s.tab('advanced', _('Advanced'));

		o = s.taboption('general', form.Flag, 'enabled', _('Enabled'),
			_('Run the agent. Fill in the settings below first; Save & Apply starts or stops it at once.'));
		o.default = '1';
		o.rmempty = false;

		o = s.taboption('general', form.ListValue, 'role', _('Role'),
			_('The client opens the control connection, the server accepts it. Start the server side first.'));
		o.value('client', _('Client'));
		o.value('server', _('Server'));
		o.rmempty = false;

		o = s.taboption('general', form.DynamicList, 'server_address', _('Server address'),
			_('Where the server accepts the control connection, as host:port (IPv6 as [address]:port); the port defaults to 7000. Several addresses, e.g. the server\'s address on each carrier, are tried in order.'));
		o.depends('role', 'client');
		o.placeholder = '203.0.113.10:7000';
		o.rmempty = false;
		o.validate = function(section_id, value) {
			return checkHostPort(value, true);
		};

		o = s.taboption('general', form.Value, 'listen_address', _('Listen address'),
			_('Address and TCP port the control connection is accepted on, e.g. 0.0.0.0:7000 or [::]:7000; the port defaults to 7000.'));
		o.depends('role', 'server');
		o.placeholder = '0.0.0.0:7000';
		o.rmempty = false;
		o.validate = function(section_id, value) {
			return checkHostPort(value, false);
		};

		o = s.taboption('general', form.Value, 'psk', _('Pre-shared key'),
			_('32 random bytes in base64, the same on both sites. Keep it secret. A server with per-site keys (below) may leave it empty: then only those are accepted.'));
		o.password = true;
		o.validate = function(section_id, value) {
			if ((value == null || value === '') && this.section.formvalue(section_id, 'role') != 'server')
				return _('Required: the same key on both sites');
			return validatePsk(section_id, value);
		};

		o = s.taboption('general', form.Button, '_generate_psk', _('Generate pre-shared key'),
			_('Fills in a new random key made by this browser. Save it here, then enter the same key on the other site.'));
		o.inputtitle = _('Generate');
		o.inputstyle = 'apply';
		o.onclick = function(ev, section_id) {
			var widget = this.section.getUIElement(section_id, 'psk');

			if (widget) {
				widget.setValue(generatePsk());
				widget.triggerValidation();
			}
		};

		o = s.taboption('general', form.Value, 'name', _('Site name'),
			_('How the other site, its logs and this page name this site. Empty: the router\'s hostname and vNIC address.'));
		o.placeholder = _('e.g. branch-shanghai');
		o.validate = function(section_id, value) {
			if (value == null || value === '' || /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(value))
				return true;
			return _('Expecting a name of letters, digits, "_", "-" and "." (at most 64, starting with a letter or digit)');
		};

		o = s.taboption('general', form.Flag, 'pair_unmatched', _('Pair unmatched carriers'),
			_('Carriers without a same-type partner on the other site stay idle unless this is on; then the leftovers are paired across carriers.'));
		o.default = '0';

		o = s.taboption('general', form.Flag, 'hub_forward', _('Site-to-site through this hub'),
			_('Server with several client sites: tell every site the addresses and LANs of the others and forward between them. Off: each site reaches only this router\'s LAN.'));
		o.default = '0';
		o.depends('role', 'server');

		o = s.taboption('general', form.Flag, 'direct', _('Direct paths between sites'),
			_('Two sites of one hub that talk to each other open a session of their own, straight between their carriers where NAT allows, keyed so that the hub cannot read it; their traffic goes back through the hub when that path fails. Both sites and the hub must allow it. Off: everything between sites passes the hub.'));
		o.default = '1';

		o = s.taboption('advanced', form.Value, 'direct_private_key', _('Direct key (optional)'),
			_('This site\'s static key for direct paths (mpvpn genkey), so that other sites can pin its public key (the status page and mpvpn status show it). Unset: a new key at every start, which nobody can pin.'));
		o.password = true;
		o.validate = validatePsk;
		o.depends('role', 'client');

		o = s.taboption('advanced', form.DynamicList, 'direct_peer_key', _('Pinned direct keys'),
			_('Other sites\' direct keys as "site name=public key". An offer from the hub for such a site with another key is refused and its traffic stays through the hub, so the hub cannot sit in the middle of a direct path.'));
		o.validate = validatePin;
		o.depends('role', 'client');

		o = s.taboption('advanced', form.Flag, 'direct_pinned_only', _('Direct only with pinned sites'),
			_('Go direct only with the sites pinned above; the traffic with all others stays through the hub.'));
		o.default = '0';
		o.depends('role', 'client');

		o = s.taboption('advanced', form.Value, 'private_key', _('Private key (optional)'),
			_('This site\'s X25519 private key (mpvpn genkey). With the peer\'s public key, the handshake also proves both sites\' keys, so a leaked pre-shared key alone cannot impersonate a site. Set both or neither.'));
		o.password = true;
		o.validate = validatePsk;

		o = s.taboption('advanced', form.Value, 'peer_public_key', _('Peer public key (optional)'),
			_('The other site\'s X25519 public key (mpvpn pubkey on that site prints it).'));
		o.validate = validatePsk;

		o = s.taboption('general', form.ListValue, 'mode', _('Mode'),
			_('How packets are spread over the subflows.'));
		o.value('duplicate', _('Duplicate: every packet on every subflow'));
		o.value('aggregate', _('Aggregate: each packet on one subflow, spread by link quality'));
		o.value('adaptive', _('Adaptive: duplicate over lossy subflows, spread over good ones'));
		o.default = 'duplicate';
		implicitDefault(o);

		o = s.taboption('general', form.Value, 'target_loss', _('Target loss (adaptive mode)'),
			_('The loss each packet may have in adaptive mode; it goes on the fewest subflows whose combined loss meets it (0.001 = 0.1 %).'));
		o.datatype = 'and(ufloat,range(0.000001,0.5))';
		o.placeholder = '0.001';
		o.depends('mode', 'adaptive');

		o = s.taboption('advanced', form.ListValue, 'nack', _('Re-send requests (NACK)'),
			_('Ask the other site to re-send packets that were lost on every subflow. Automatic: on in every mode; in duplicate mode only for what the carriers\' own loss explains (the rest, usually a full queue, is given up at once).'));
		o.value('auto', _('Automatic'));
		o.value('1', _('On'));
		o.value('0', _('Off'));
		o.default = 'auto';
		implicitDefault(o);

		o = s.taboption('general', form.DynamicList, 'lan_subnet', _('Extra LAN subnets'),
			_('Subnets behind this router, besides the LAN of the "lan" interface, that the peer routes into the tunnel.'));
		o.datatype = 'cidr';
		o.placeholder = '192.168.30.0/24';

		o = s.taboption('advanced', form.Value, 'keepalive_idle', _('Idle keepalive interval (s)'),
			_('Keepalive interval of a subflow without traffic (0.05 to 60 seconds).'));
		o.datatype = 'and(ufloat,range(0.05,60))';
		o.placeholder = '0.75';

		o = s.taboption('advanced', form.Value, 'keepalive_active', _('Active keepalive interval (s)'),
			_('Keepalive interval of a subflow while data flows (0.01 to 60 seconds).'));
		o.datatype = 'and(ufloat,range(0.01,60))';
		o.placeholder = '0.1';

		o = s.taboption('advanced', form.DynamicList, 'stun', _('STUN servers'),
			_('Servers each uplink asks for its public address and port and its kind of NAT (host:port, port default 3478). The answers go to the other site so that uplinks behind NAT can still reach each other (hole punching). Two servers, or one with two addresses, tell the kinds of NAT apart. Empty: no STUN.'));
		o.placeholder = 'stun.example.net:3478';
		o.validate = function(section_id, value) {
			return checkHostPort(value, true);
		};

		o = s.taboption('advanced', form.Value, 'nat_keepalive', _('NAT keepalive (s)'),
			_('Longest idle keepalive interval, so that NAT mappings on the way stay open (1 to 300 seconds; below the usual 30 s UDP timeout of NATs).'));
		o.datatype = 'and(ufloat,range(1,300))';
		o.placeholder = '25';

		o = s.taboption('advanced', form.Value, 'relay_after', _('Relay after (s)'),
			_('With relays configured: how long a subflow may stay down (direct path and hole punching failed) before its uplink uses a relay (1 to 600 seconds).'));
		o.datatype = 'and(ufloat,range(1,600))';
		o.placeholder = '4';

		o = s.taboption('advanced', form.Value, 'relay_retry', _('Relay retry (s)'),
			_('A relay that failed is skipped for this long before it is tried again (1 to 3600 seconds).'));
		o.datatype = 'and(ufloat,range(1,3600))';
		o.placeholder = '10';

		o = s.taboption('advanced', form.Value, 'workers', _('Data-path processes'),
			_('Server only: processes that carry the tunnels, each holding some of the sites (auto: one per CPU core). For a hub with many sites whose CPU is the limit; 1 keeps everything in one process. Not with STUN servers or relays.'));
		o.placeholder = '1';
		o.validate = validateWorkers;
		o.depends('role', 'server');

		o = s.taboption('advanced', form.Value, 'dead_after', _('Dead after'),
			_('A subflow is down after this many consecutive unanswered keepalives (1 to 100).'));
		o.datatype = 'and(uinteger,range(1,100))';
		o.placeholder = '3';

		o = s.taboption('advanced', form.Value, 'hold_max_ms', _('Longest reorder wait (ms)'),
			_('Longest time a packet waits in the reorder buffer for a missing predecessor (0 to 10000 ms).'));
		o.datatype = 'and(uinteger,range(0,10000))';
		o.placeholder = '200';

		o = s.taboption('advanced', form.Value, 'rekey_interval', _('Rekey interval (s)'),
			_('New data keys from a fresh handshake (forward secrecy) this often; traffic is not interrupted (1 to 86400 seconds).'));
		o.datatype = 'and(ufloat,range(1,86400))';
		o.placeholder = '120';

		o = s.taboption('advanced', form.Value, 'rekey_packets', _('Rekey after packets'),
			_('Also rekey after this many packets under one key (1000 to 67108864, the AEAD usage limit kept by default). Leave empty.'));
		o.datatype = 'and(uinteger,range(1000,67108864))';
		o.placeholder = '67108864';

		o = s.taboption('advanced', form.Value, 'reorder_capacity', _('Reorder buffer size (packets)'),
			_('When the buffer is full everything in it is delivered (16 to 65536).'));
		o.datatype = 'and(uinteger,range(16,65536))';
		o.placeholder = '4096';

		o = s.taboption('advanced', form.Value, 'rx_buffer', _('Uplink receive buffer (KiB)'),
			_('Kernel receive buffer of each uplink socket (32 to 16384; empty: 4096 capped by the kernel\'s limit). When the router\'s CPU is the bottleneck, bulk downloads keep it full and a call or a game waits behind it: smaller (256) means less delay under load, larger more bulk throughput.'));
		o.datatype = 'and(uinteger,range(32,16384))';
		o.placeholder = _('kernel limit');

		o = s.taboption('advanced', form.Value, 'mtu', _('Tunnel MTU'),
			_('MTU of the tunnel interface. 1400 keeps encapsulated packets within a 1500-byte path (overhead: 64 bytes over IPv4 uplinks, 84 over IPv6).'));
		o.datatype = 'and(uinteger,range(576,9000))';
		o.placeholder = '1400';

		o = s.taboption('advanced', form.Flag, 'mss_clamp', _('Clamp TCP MSS'),
			_('Lower the MSS of TCP connections through the tunnel to what the tunnel MTU carries, so they never wait for path-MTU discovery. Turn off only if the firewall already clamps on the tunnel interface.'));
		o.default = '1';

		o = s.taboption('advanced', form.ListValue, 'log_level', _('Log level'),
			_('Verbosity of the agent\'s messages in the system log.'));
		o.value('debug', _('Debug'));
		o.value('info', _('Info'));
		o.value('warning', _('Warning'));
		o.value('error', _('Error'));
		o.default = 'info';
		implicitDefault(o);

		/* --- config vnc 'vnc' -------------------------------------------------- */

		s = m.section(form.NamedSection, 'vnc', 'vnc', _('Tunnel interface'),
			_('The virtual interface that carries the traffic between the sites. The two sites use two addresses of one small subnet, e.g. 172.30.0.1 and 172.30.0.2 in a /30.'));
		s.addremove = false;

		o = s.option(form.Value, 'ipaddr', _('IPv4 address'),
			_('This site\'s address on the tunnel, optionally with a /prefix (e.g. 172.30.0.1/30).'));
		o.datatype = 'or(ip4addr(1),cidr4)';
		o.placeholder = '172.30.0.1';
		o.rmempty = false;

		/*
		 * A plain text field, no list of suggestions (as the carrier type
		 * below): with o.value() choices LuCI makes a ui.Combobox, which
		 * validates only its custom-value input, so a cleared netmask was
		 * never marked.  A text field runs this validator on empty too
		 * (validation.js: an optional empty value passes the datatype check,
		 * then vfunc decides), which says when the mask is needed.
		 */
		o = s.option(form.Value, 'netmask', _('Netmask'),
			_('A dotted netmask or a prefix length from 8 to 30. Not needed when the address carries a /prefix.'));
		o.placeholder = '255.255.255.252';
		o.validate = function(section_id, value) {
			if (value == null || value === '') {
				var addr = this.section.formvalue(section_id, 'ipaddr');
				return (addr && String(addr).indexOf('/') < 0)
					? _('Expecting a netmask, e.g. 255.255.255.252, or an address with a /prefix')
					: true;
			}

			var prefix = netmaskPrefix(value);

			if (prefix == null || prefix > 32)
				return _('Expecting a netmask such as 255.255.255.252 or a prefix length such as 30');
			if (prefix > 30)
				return _('A /%d leaves no room for both ends of the tunnel: use /30 (255.255.255.252) or larger').format(prefix);
			if (prefix < 8)
				return _('A /%d is far too large for a point-to-point link: use /8 to /30').format(prefix);

			return true;
		};

		o = s.option(form.Value, 'ifname', _('Interface name'),
			_('Name of the tunnel device.'));
		o.placeholder = 'mpvpn0';
		o.validate = function(section_id, value) {
			if (value == null || value === '' || validIfname(value))
				return true;
			return _('Expecting 1 to 15 characters without "/", ":" or spaces');
		};

		o = s.option(form.Value, 'mtu', _('MTU'),
			_('MTU of the tunnel interface; overrides the general tunnel MTU when set.'));
		o.datatype = 'and(uinteger,range(576,9000))';
		o.placeholder = _('as in the general settings');

		/* --- config smpu (one per uplink) -------------------------------------- */

		s = listSection(m, 'smpu', _('Uplinks'),
			_('One uplink per carrier. Each uplink is paired with the peer\'s uplink of the same carrier type, one subflow per pair. Give either the uplink\'s own address or its OpenWrt interface.'),
			true, true);

		/*
		 * A plain text field, not a list of suggestions: LuCI's ui.Combobox is
		 * always optional and validates only its custom-value input, so an
		 * empty choice was never marked and the dialog's Save failed silently.
		 * A text field with rmempty = false turns red on empty ("Expecting:
		 * non-empty value") and shows this validator's messages.
		 */
		o = s.option(form.Value, 'type', _('Carrier type'),
			_('Carrier of this uplink, e.g. telecom, unicom or mobile: letters, digits, "_", "-" and ".". The peer\'s uplink of the same type is its partner.'));
		o.placeholder = _('e.g. telecom');
		o.rmempty = false;
		o.validate = function(section_id, value) {
			/* required: named here too, for a value that is only spaces or cleared */
			if (value == null || value === '')
				return _('Required: the carrier of this uplink, e.g. telecom; the peer\'s uplink of the same type is its partner');
			if (validCarrier(value))
				return true;
			return _('Expecting a word of letters, digits, "_", "-" and "." (at most 32 characters)');
		};

		o = s.option(form.Value, 'bind_ip', _('Bind address'),
			_('This uplink\'s own IPv4 or IPv6 address; the subflow\'s UDP socket is bound to it.'));
		o.datatype = 'ipaddr(1)';
		o.validate = function(section_id, value) {
			if ((value == null || value === '') && !this.section.formvalue(section_id, 'interface'))
				return _('Set the bind address or the interface of this uplink');
			return true;
		};

		o = s.option(widgets.NetworkSelect, 'interface', _('Interface'),
			_('OpenWrt interface of the uplink, e.g. wan2; the agent follows its address.'));
		o.nocreate = true;
		o.optional = true;

		o = s.option(form.Value, 'device', _('Device'),
			_('Linux device to bind the socket to; found from the interface when that is set.'));
		o.modalonly = true;
		o.validate = function(section_id, value) {
			if (value == null || value === '' || validIfname(value))
				return true;
			return _('Expecting 1 to 15 characters without "/", ":" or spaces');
		};

		o = s.option(form.Value, 'port', _('Local port'),
			_('Local UDP port of the subflow. Default: the port of the listen address (server) or of the first server address (client), else 7000.'));
		o.datatype = 'and(port,min(1))';
		o.placeholder = _('default');

		o = s.option(form.Value, 'upload', _('Upload (kbit/s)'),
			_('Optional: this uplink\'s upload speed in kbit/s, e.g. 20000 for 20 Mbit/s. Aggregate and adaptive modes start from it instead of assuming 10 Mbit/s until the link is measured.'));
		o.datatype = 'and(uinteger,range(8,100000000))';
		o.placeholder = _('measured');
		o.modalonly = true;

		/* --- config site (a hub's per-site keys) ------------------------------- */

		s = listSection(m, 'site', _('Client sites (server)'),
			_('A server with several client sites can give each its own pre-shared key (that site\'s key in its general settings). A leaked key then cuts off one site, and the status shows which site each session is. Clients ignore these.'),
			true, false);

		o = s.option(form.Value, 'psk', _('Pre-shared key'),
			_('This site\'s own key: 32 random bytes in base64.'));
		o.password = true;
		o.rmempty = false;
		o.validate = validatePsk;

		o = s.option(form.Value, 'vnc_ipaddr', _('vNIC address'),
			_('The vNIC address this site must use (its own vNIC address); the server refuses any other. Empty: any free address of the vNIC subnet.'));
		o.datatype = 'ipaddr';
		o.modalonly = true;

		o = s.option(form.DynamicList, 'lan_subnet', _('Allowed LAN subnets'),
			_('The LAN subnets this site may announce: each of its LANs must lie inside one of them. Empty: any LAN that collides with no other site\'s.'));
		o.datatype = 'cidr';
		o.placeholder = '192.168.30.0/24';
		o.modalonly = true;

		o = s.option(form.Flag, 'forward', _('Site-to-site'),
			_('With site-to-site through this hub on: off keeps this site apart. It is not told about the other sites, they are not told about it, and nothing passes between them; it still reaches this router\'s LAN.'));
		o.default = '1';
		o.modalonly = true;

		o = s.option(form.Flag, 'direct', _('Direct paths'),
			_('With direct paths on: off offers this site none, so everything between it and the other sites passes this hub (to filter or log it here).'));
		o.default = '1';
		o.modalonly = true;

		/* --- config policy (per-host link policies, seed 004) ------------------- */

		s = listSection(m, 'policy', _('Link policies'),
			_('Which carriers the traffic of a LAN host or subnet may use. The first matching policy wins; if none of its carriers is up, the traffic falls back to the others.'),
			true, true);

		o = s.option(form.Value, 'src', _('Source host or subnet'),
			_('LAN host or subnet whose traffic this policy steers, e.g. 192.168.10.50 or 192.168.10.0/25.'));
		o.datatype = 'or(ipaddr,cidr)';
		o.rmempty = false;

		o = s.option(form.Value, 'dst', _('Destination (optional)'),
			_('Only traffic to this host or subnet at the peer site.'));
		o.datatype = 'or(ipaddr,cidr)';

		o = s.option(form.DynamicList, 'carrier', _('Carriers'),
			_('Carrier types (the uplinks\' type) this traffic may use; any if empty.'));
		o.validate = function(section_id, value) {
			if (value == null || value === '' || validCarrier(value))
				return true;
			return _('Expecting a carrier word of letters, digits, "_", "-" and "."');
		};

		o = s.option(form.Flag, 'exclusive', _('Exclusive'),
			_('Reserve these carriers for this traffic: nothing else may use them.'));
		o.default = '0';

		o = s.option(form.Flag, 'priority', _('Priority'),
			_('Serve this traffic before all other traffic (aggregate and adaptive modes).'));
		o.default = '0';

		o = s.option(form.ListValue, 'mode', _('Mode'),
			_('This traffic\'s mode instead of the general one.'));
		o.value('', _('as in the general settings'));
		o.value('duplicate', _('Duplicate'));
		o.value('aggregate', _('Aggregate'));
		o.value('adaptive', _('Adaptive'));

		/* --- config relay (TURN relays for uplinks behind symmetric NAT) -------- */

		s = listSection(m, 'relay', _('Relays'),
			_('TURN relays (e.g. coturn) for carriers whose direct path does not open, typically when both ends are behind symmetric NAT (mobile networks). They are tried in order; a relay that fails is skipped for the next. The relay forwards the encrypted traffic and cannot read it.'),
			false, true);

		o = s.option(form.Value, 'address', _('Relay address'),
			_('The relay\'s address and port, e.g. 203.0.113.7:3478 or turn.example.net (port 3478 when left out).'));
		o.rmempty = false;
		o.validate = validateRelayAddress;

		o = s.option(form.Value, 'username', _('User name'),
			_('The relay account\'s user name.'));
		o.rmempty = false;
		o.validate = validateCredential;

		o = s.option(form.Value, 'password', _('Password'),
			_('The relay account\'s password.'));
		o.password = true;
		o.rmempty = false;
		o.modalonly = true;
		o.validate = validateCredential;

		return m.render();
	}
});
