/*
 * TEST FIXTURE - not part of the package and not LuCI.
 *
 * The smallest stand-in for the LuCI client API (modelled on luci-base of
 * OpenWrt 23.05/24.10: luci.js, rpc.js, ui.js) that the views of
 * luci-app-mpvpn use, so that a real browser can load and render a view
 * without a router:
 *
 *   E(), String.prototype.format (%s %d %f %t %%)
 *   _(), N_()                        cbi.js: looked up in window.TR (the catalog
 *                                    script /harness/translations, as LuCI's
 *                                    admin/translations/<lang>), by sfh()
 *   dom.create/append/content/attr   strings given as children become markup
 *                                    (innerHTML), exactly like LuCI's dom.append,
 *                                    so a view that passes agent text that way
 *                                    shows up in the escaping test
 *   rpc.declare                      ubus JSON-RPC 'call' over HTTP POST with the
 *                                    session id L.env.sessionid, with rpc.js's
 *                                    expect/reject handling and error texts
 *   L.hasViewPermission              luci.js: null without a satisfied nodespec,
 *                                    else false on a read-only page
 *   poll.add                         LuCI's 1 s tick loop: runs at once, then every
 *                                    `interval` seconds, never overlapping itself
 *   ui.Table, ui.addNotification, ui.createHandlerFn
 *   view.extend                      load() -> render() -> #view
 *   loadView(path, sid)              fetches what the dispatcher puts into L.env
 *                                    (sessionid, nodespec) and the view, and
 *                                    compiles it the way L.require does
 *                                    ('require x' pragmas become the factory's
 *                                    parameters)
 *
 * Works in a browser (window) and, for the static tests, in node (globalThis).
 */
(function(window) {
	'use strict';

	var document = window.document;

	/* --- String.prototype.format (subset of LuCI's) ----------------------- */

	String.prototype.format = function() {
		var args = arguments, n = 0;

		return this.replace(/%(?:(%)|(-?\d*)(?:\.(\d+))?([sdftqh]))/g, function(m, pct, width, prec, conv) {
			if (pct)
				return '%';

			var v = args[n++], s;

			switch (conv) {
			case 'd':
				s = String(~~v);
				break;

			case 'f':
				s = (prec != null) ? (+v || 0).toFixed(+prec) : String(+v || 0);
				break;

			case 't':
				var ts = ~~v, td = 0, th = 0, tm = 0;
				if (ts > 59) { tm = Math.floor(ts / 60); ts = ts % 60; }
				if (tm > 59) { th = Math.floor(tm / 60); tm = tm % 60; }
				if (th > 23) { td = Math.floor(th / 24); th = th % 24; }
				s = (td > 0) ? '%dd %dh %dm %ds'.format(td, th, tm, ts) : '%dh %dm %ds'.format(th, tm, ts);
				break;

			default:  /* s, q, h: no escaping needed for the fixture's text nodes */
				s = (v == null) ? '' : String(v);
			}

			return s;
		});
	};

	/* --- _() and N_(): luci-base cbi.js ------------------------------------------
	 *
	 * As in cbi.js (luci-base 23.05/24.10): the catalog is window.TR, the object
	 * the dispatcher's action_translations writes (script admin/translations/<lang>,
	 * loaded before the views): "%08x" of the key's hash -> translation, the
	 * hash being sfh() (lmo.c sfh_hash: Paul Hsieh's SuperFastHash over the
	 * key's UTF-8 bytes, seeded with their length) of the whitespace-trimmed
	 * key; msgctxt + '\u0001' + msgid with a context, + '\u0002' + plural index
	 * for N_().  An untranslated string comes back unchanged.  TR['00000000']
	 * holds the catalog's Plural-Forms.  tests/luci_i18n.py computes the same
	 * hashes in Python (tests/test_luci_i18n.py compares the two).
	 */

	function utf8(s) {
		var bytes = [];

		for (var i = 0; i < s.length; i++) {
			var ch = s.charCodeAt(i);

			if (ch <= 0x7F)
				bytes.push(ch);
			else if (ch <= 0x7FF)
				bytes.push(0xC0 | (ch >>> 6), 0x80 | (ch & 0x3F));
			else  /* as cbi.js: UTF-16 units, so no 4-byte sequences */
				bytes.push(0xE0 | (ch >>> 12), 0x80 | ((ch >>> 6) & 0x3F), 0x80 | (ch & 0x3F));
		}

		return bytes;
	}

	function sfh(s) {
		if (s == null || s.length === 0)
			return null;

		var b = utf8(s), n = b.length, h = n >>> 0, off = 0, tmp;

		function get16(o) { return (b[o] | (b[o + 1] << 8)) >>> 0; }
		function s8(o) { return (b[o] > 0x7F) ? b[o] - 256 : b[o]; }

		for (var k = n >>> 2; k > 0; k--, off += 4) {
			h = (h + get16(off)) >>> 0;
			tmp = ((get16(off + 2) << 11) ^ h) >>> 0;
			h = ((h << 16) ^ tmp) >>> 0;
			h = (h + (h >>> 11)) >>> 0;
		}

		switch (n & 3) {
		case 3:
			h = (h + get16(off)) >>> 0;
			h = (h ^ (h << 16)) >>> 0;
			h = (h ^ (s8(off + 2) << 18)) >>> 0;
			h = (h + (h >>> 11)) >>> 0;
			break;
		case 2:
			h = (h + get16(off)) >>> 0;
			h = (h ^ (h << 11)) >>> 0;
			h = (h + (h >>> 17)) >>> 0;
			break;
		case 1:
			h = (h + s8(off)) >>> 0;
			h = (h ^ (h << 10)) >>> 0;
			h = (h + (h >>> 1)) >>> 0;
		}

		h = (h ^ (h << 3)) >>> 0;
		h = (h + (h >>> 5)) >>> 0;
		h = (h ^ (h << 4)) >>> 0;
		h = (h + (h >>> 17)) >>> 0;
		h = (h ^ (h << 25)) >>> 0;
		h = (h + (h >>> 6)) >>> 0;

		return ('0000000' + h.toString(16)).slice(-8);
	}

	function trimws(s) {
		return String(s).trim().replace(/[ \t\n]+/g, ' ');
	}

	var pluralFn = null, asked = [];

	/* fixture only, not in cbi.js: every distinct msgid asked for, on <body data-gettext> */
	function record(s) {
		if (asked.indexOf(s) >= 0)
			return;
		asked.push(s);
		if (document && document.body)
			document.body.setAttribute('data-gettext', JSON.stringify(asked));
	}

	window._ = function(s, c) {
		var k = (c != null ? trimws(c) + '\u0001' : '') + trimws(s);
		record(k);
		return (window.TR && window.TR[sfh(k)]) || s;
	};

	window.N_ = function(n, s, p, c) {
		if (pluralFn == null && window.TR)  /* sloppy-mode Function: plural= assigns a global, as in cbi.js */
			pluralFn = new Function('n', (window.TR['00000000'] || 'plural=(n != 1);') + 'return +plural');

		var i = pluralFn ? pluralFn(n) : (n != 1),
		    k = (c != null ? trimws(c) + '\u0001' : '') + trimws(s) + '\u0002' + (+i).toString();

		record(k);
		return (window.TR && window.TR[sfh(k)]) || (i ? p : s);
	};

	/* --- dom ----------------------------------------------------------------- */

	var dom = {
		elem: function(e) {
			return (e != null && typeof(e) == 'object' && 'nodeType' in e);
		},

		append: function(node, children) {
			if (!this.elem(node))
				return null;

			if (Array.isArray(children)) {
				for (var i = 0; i < children.length; i++)
					if (this.elem(children[i]))
						node.appendChild(children[i]);
					else if (children !== null && children !== undefined)  /* sic, as LuCI */
						node.appendChild(document.createTextNode('' + children[i]));

				return node.lastChild;
			}
			else if (typeof(children) === 'function') {
				return this.append(node, children(node));
			}
			else if (this.elem(children)) {
				return node.appendChild(children);
			}
			else if (children !== null && children !== undefined) {
				node.innerHTML = '' + children;  /* LuCI semantics: a string is markup */
				return node.lastChild;
			}

			return null;
		},

		content: function(node, children) {
			if (!this.elem(node))
				return null;

			while (node.firstChild)
				node.removeChild(node.firstChild);

			return this.append(node, children);
		},

		attr: function(node, key, val) {
			if (!this.elem(node))
				return null;

			var attr = null;

			if (typeof(key) === 'object' && key !== null)
				attr = key;
			else if (typeof(key) === 'string')
				attr = {}, attr[key] = val;

			for (key in attr) {
				if (!attr.hasOwnProperty(key) || attr[key] == null)
					continue;

				switch (typeof(attr[key])) {
				case 'function':
					node.addEventListener(key, attr[key]);
					break;

				case 'object':
					node.setAttribute(key, JSON.stringify(attr[key]));
					break;

				default:
					node.setAttribute(key, attr[key]);
				}
			}
		},

		create: function() {
			var html = arguments[0], attr = arguments[1], data = arguments[2], elem;

			if (!(attr instanceof Object) || Array.isArray(attr))
				data = attr, attr = null;

			if (Array.isArray(html)) {
				elem = document.createDocumentFragment();
				for (var i = 0; i < html.length; i++)
					elem.appendChild(this.create(html[i]));
			}
			else if (this.elem(html)) {
				elem = html;
			}
			else if (html.charCodeAt(0) === 60) {
				throw new Error('harness: markup strings are not supported: ' + html);
			}
			else {
				elem = document.createElement(html);
			}

			this.attr(elem, attr);
			this.append(elem, data);

			return elem;
		}
	};

	window.E = function() { return dom.create.apply(dom, arguments); };

	/* --- poll (LuCI.Poll) ------------------------------------------------------ */

	var poll = {
		queue: [],
		tick: 0,
		timer: null,

		add: function(fn, interval) {
			if (isNaN(interval) || !(interval > 0) || typeof(fn) != 'function')
				throw new TypeError('Invalid argument to LuCI.Poll.add()');

			for (var i = 0; i < this.queue.length; i++)
				if (this.queue[i].fn === fn)
					return false;

			this.queue.push({ r: true, i: interval >>> 0, fn: fn });
			window.harness.polls.push(interval);

			if (this.timer == null) {
				this.tick = 0;
				this.timer = window.setInterval(this.step, 1000);
				this.step();
			}

			return true;
		},

		step: function() {
			for (var i = 0, e; (e = poll.queue[i]) != null; i++) {
				if ((poll.tick % e.i) != 0 || !e.r)
					continue;

				e.r = false;
				Promise.resolve(e.fn()).finally((function() { this.r = true; }).bind(e));
			}

			poll.tick++;
		},

		active: function() { return this.timer != null; }
	};

	/* --- rpc (LuCI.rpc: declare + reply handling) ------------------------------ */

	var STATUS_TEXT = [ 'Command OK', 'Invalid command', 'Invalid argument', 'Method not found',
		'Resource not found', 'No data received', 'Permission denied', 'Request timeout',
		'Not supported', 'Unspecified error', 'Connection lost' ];

	function rpcError(fmt) {
		var e = new Error(fmt.format.apply(fmt, Array.prototype.slice.call(arguments, 1)));
		e.name = 'RPCError';
		e.message += '\n  at harness (luci-stub.js)';  /* L.raise appends a stack trace */
		return e;
	}

	var rpcRequestID = 1;

	var rpc = {
		baseURL: '/ubus/',

		declare: function(options) {
			return function() {
				var args = Array.prototype.slice.call(arguments), params = {};

				(options.params || []).forEach(function(p, i) { params[p] = args[i]; });

				var msg = {
					jsonrpc: '2.0',
					id: rpcRequestID++,
					method: 'call',
					params: [ L.env.sessionid || '00000000000000000000000000000000', options.object, options.method, params ]
				};

				return window.fetch(rpc.baseURL, {
					method: 'POST',
					headers: { 'Content-Type': 'application/json' },
					body: JSON.stringify(msg)
				}).then(function(res) {
					if (!res.ok)
						throw rpcError('RPC call to %s/%s failed with HTTP error %d: %s',
							options.object, options.method, res.status, res.statusText || '?');
					return res.json();
				}).then(function(reply) {
					var ret = null, type = Object.prototype.toString;

					if (reply == null || typeof(reply) != 'object' || reply.jsonrpc != '2.0')
						throw rpcError('RPC call to %s/%s returned invalid message frame',
							options.object, options.method);

					if (reply.error && reply.error.code && reply.error.message)
						throw rpcError('RPC call to %s/%s failed with error %d: %s',
							options.object, options.method, reply.error.code, reply.error.message);

					if (Array.isArray(reply.result)) {
						if (options.reject && reply.result[0] !== 0)
							throw rpcError('RPC call to %s/%s failed with ubus code %d: %s',
								options.object, options.method, reply.result[0],
								STATUS_TEXT[reply.result[0]] || 'Unknown error code');

						ret = (reply.result.length > 1) ? reply.result[1] : reply.result[0];
					}

					if (options.expect) {
						for (var key in options.expect) {
							if (ret != null && key != '')
								ret = ret[key];

							if (ret == null || type.call(ret) != type.call(options.expect[key]))
								ret = options.expect[key];

							break;
						}
					}

					return ret;
				});
			};
		}
	};

	/* --- ui ---------------------------------------------------------------------- */

	function Table(captions, options, placeholder) {
		this.options = options || {};
		this.id = this.options.id || 'table' + Math.floor(Math.random() * 1e8);
		this.node = E('table', { 'id': this.id, 'class': 'table' }, [
			E('tr', { 'class': 'tr table-titles' }, captions.map(function(c) {
				return E('th', { 'class': 'th' }, [ c ]);
			}))
		]);

		if (placeholder)
			this.node.appendChild(E('tr', { 'class': 'tr placeholder' }, [
				E('td', { 'class': 'td' }, placeholder)
			]));
	}

	Table.prototype.update = function(data, placeholder) {
		placeholder = placeholder || this.options.placeholder || 'No data';

		if (!Array.isArray(data))
			return;

		var headings = [].slice.call(this.node.firstElementChild.querySelectorAll('th'));

		while (this.node.lastElementChild !== this.node.firstElementChild)
			this.node.removeChild(this.node.lastElementChild);

		data.forEach(function(row, n) {
			var tr = E('tr', { 'class': 'tr cbi-rowstyle-' + ((n % 2) ? 2 : 1) });

			for (var i = 0; i < headings.length; i++) {
				var raw = Array.isArray(row[i]) ? row[i][0] : null,
				    disp = Array.isArray(row[i]) ? row[i][1] : row[i];

				tr.appendChild(E('td', {
					'class': 'td',
					'data-title': (headings[i].textContent || '').trim() || null,
					'data-value': raw
				}, (disp != null) ? disp : ''));
			}

			this.node.appendChild(tr);
		}, this);

		if (!data.length)
			this.node.appendChild(E('tr', { 'class': 'tr placeholder' }, [
				E('td', { 'class': 'td' }, placeholder)
			]));

		return this.node;
	};

	Table.prototype.render = function() { return this.node; };

	var ui = {
		Table: Table,

		addNotification: function(title, children) {
			var mc = document.querySelector('#maincontent') || document.body,
			    msg = E('div', { 'class': 'alert-message fade-in' });

			if (title != null)
				dom.append(msg, E('h4', {}, title));

			dom.append(msg, children);

			for (var i = 2; i < arguments.length; i++)
				msg.classList.add(arguments[i]);

			mc.insertBefore(msg, mc.firstElementChild);
			return msg;
		},

		createHandlerFn: function(ctx, fn) {
			var bound = Array.prototype.slice.call(arguments, 2);

			if (typeof(fn) == 'string')
				fn = ctx[fn];

			return function(ev) {
				var btn = ev.currentTarget;
				var rv = fn.apply(ctx, bound.concat([ ev ]));

				if (rv && typeof(rv.then) == 'function' && btn) {
					btn.classList.add('spinning');
					btn.disabled = true;
					rv.finally(function() {
						btn.classList.remove('spinning');
						btn.disabled = false;
					});
				}

				return rv;
			};
		}
	};

	/* --- view --------------------------------------------------------------------- */

	var viewBase = {
		__init__: function() {
			var vp = document.getElementById('view');

			dom.content(vp, E('div', { 'class': 'spinning' }, [ 'Loading view...' ]));

			return Promise.resolve(this.load())
				.then(this.render.bind(this))
				.then(function(nodes) {
					dom.content(vp, nodes);
					window.harness.rendered++;
				})
				.catch(window.harness.fail);
		},
		load: function() {},
		render: function() {}
	};

	var view = {
		extend: function(props) {
			function View() { this.__init__.apply(this, arguments); }
			View.prototype = Object.assign(Object.create(viewBase), props);
			return View;
		}
	};

	/* --- L and the module loader ---------------------------------------------------- */

	var L = window.L = { env: {}, dom: dom, poll: poll, rpc: rpc, ui: ui, view: view };

	/* luci.js hasViewPermission() */
	L.hasViewPermission = function() {
		var ns = L.env.nodespec;

		if (ns == null || typeof(ns) != 'object' || !ns.satisfied)
			return null;

		return !ns.readonly;
	};

	L.bind = function(fn, self) {
		return Function.prototype.bind.apply(fn, [ self ].concat(Array.prototype.slice.call(arguments, 2)));
	};

	var modules = { view: view, rpc: rpc, poll: poll, ui: ui, dom: dom };

	/* L.require's pragma scan: leading 'use strict' / 'require name [as alias]' strings */
	function requires(source) {
		var re = /^\s*(?:(?:\/\*[\s\S]*?\*\/|\/\/[^\n]*)\s*)*(['"])(.*?)\1;?/, out = [], m;

		while ((m = re.exec(source)) != null) {
			var s = m[2], r = /^require[ \t]+(\S+)(?:[ \t]+as[ \t]+([a-zA-Z_]\S*))?$/.exec(s);

			if (r)
				out.push([ r[1], r[2] || r[1].replace(/[^a-zA-Z0-9_]/g, '_') ]);
			else if (!/^use[ \t]+strict$/.test(s))
				break;

			source = source.substring(m[0].length);
		}

		return out;
	}

	window.harness = {
		rendered: 0,
		polls: [],
		errors: [],
		modules: modules,
		requires: requires,
		sfh: sfh,

		fail: function(err) {
			var msg = (err && err.stack) ? err.stack : String(err);
			window.harness.errors.push(msg);
			if (document) {
				var box = document.getElementById('harness-errors');
				if (box)
					box.appendChild(document.createTextNode(msg + '\n'));
			}
		},

		compile: function(source, url) {
			var deps = requires(source), names = '', instances = [];

			deps.forEach(function(d) {
				if (!modules.hasOwnProperty(d[0]))
					throw new Error('harness: no stub for \'require ' + d[0] + '\' in ' + url);
				names += ', ' + d[1];
				instances.push(modules[d[0]]);
			});

			var factory = eval('(function(window, document, L' + names + ') { ' + source + '\n})\n//# sourceURL=' + url);
			return factory.apply(factory, [ window, document, L ].concat(instances));
		},

		loadView: function(path, sid) {
			var url = '/luci-static/resources/view/' + path + '.js',
			    envUrl = '/harness/env?view=' + encodeURIComponent(path) + '&sid=' + encodeURIComponent(sid || '');

			return window.fetch(envUrl).then(function(res) {
				if (!res.ok)
					throw new Error('harness: HTTP ' + res.status + ' for ' + envUrl);
				return res.json();
			}).then(function(env) {
				Object.assign(L.env, env);
				return window.fetch(url);
			}).then(function(res) {
				if (!res.ok)
					throw new Error('harness: HTTP ' + res.status + ' for ' + url);
				return res.text();
			}).then(function(source) {
				var View = window.harness.compile(source, url);
				return new View();
			}).catch(window.harness.fail);
		}
	};
})(typeof(window) != 'undefined' ? window : globalThis);
