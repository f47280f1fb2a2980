/*
 * TEST FIXTURE - not part of the package.
 *
 *   node probe.js <view.js> [probes.json]
 *
 * Compiles a LuCI view the way L.require does (through luci-stub.js) with
 * recording stand-ins for 'require rpc', 'form' and 'tools.widgets', and
 * prints what the view declared, as JSON:
 *
 *   requires   the 'require' pragmas, [module, parameter name]
 *   declares   every rpc.declare() option object (ubus object, method, ...)
 *   methods    the names of the view's methods
 *   form       (views with render() building a form.Map) the map, its sections
 *              and options with their properties, value() and depends() calls
 *   probes     results of running option validators on given values, and of
 *              pressing form.Button options that have an onclick
 *
 *   saves      what one Save of the page writes into /etc/config/orayboxvpn
 *              for a given file and given edits: the parse() rules of
 *              luci-base's form.js at OpenWrt 24.10's pin (7b0663a):
 *              CBIAbstractValue.parse (invalid -> error; empty -> remove when
 *              rmempty or optional, else "must not be empty"; written only when
 *              the input differs from the file's value; inactive -> remove) and
 *              CBIFlagValue.parse (a flag equal to its default is removed when
 *              rmempty or optional, else written); the input starts as the
 *              file's value or the option's default, as renderWidget() does;
 *              an option's own write()/remove() (the view's) is used; the
 *              result lists what changes in the file (setting the value the
 *              file holds, or removing an absent option, changes nothing)
 *
 * probes.json: [{"section": "base", "option": "psk", "value": "...",
 *                "form": {"ipaddr": "..."}}, {"press": "base", "option": "_generate_psk"},
 *               {"save": {"<section id>": {".type": "smpu", "<option>": "value" | [...]}},
 *                "edits": {"<section id>": {"<option>": "value"}}}]
 */
'use strict';

const fs = require('fs');
const path = require('path');

globalThis.window = globalThis;
require(path.join(__dirname, 'luci-stub.js'));

const [ viewFile, probeFile ] = process.argv.slice(2);
const source = fs.readFileSync(viewFile, 'utf8');
const probes = probeFile ? JSON.parse(fs.readFileSync(probeFile, 'utf8')) : [];

const out = { requires: harness.requires(source), declares: [], methods: [], form: null, probes: [], saves: [] };

/* --- recording modules ------------------------------------------------------ */

const rpc = {
	declare(options) {
		out.declares.push(options);
		return function() { return Promise.reject(new Error('probe: no ubus here')); };
	}
};

function widgetClass(name) {
	const cls = function() {};
	cls.probeName = name;
	return cls;
}

const form = {};
[ 'Map', 'JSONMap', 'NamedSection', 'TypedSection', 'GridSection', 'TableSection',
  'Value', 'ListValue', 'Flag', 'DynamicList', 'MultiValue', 'TextValue', 'DummyValue',
  'Button', 'HiddenValue', 'SectionValue', 'RichListValue', 'RangeSliderValue' ].forEach(function(n) {
	form[n] = widgetClass('form.' + n);
});

/* form.AbstractValue's write()/remove(): uci.set()/uci.unset() on the map's recorder */
function recordWrite(section_id, value) {
	const file = this.map.file || {}, old = file[section_id] ? file[section_id][this.option] : null;
	/* setting the value the file already holds changes nothing in the file */
	if (old != null && JSON.stringify(Array.isArray(old) ? old : String(old)) === JSON.stringify(Array.isArray(value) ? value : String(value)))
		return;
	this.map.changes.push([ 'set', section_id, this.option, value ]);
}

function recordRemove(section_id) {
	const file = this.map.file || {};
	if (file[section_id] && file[section_id][this.option] != null)  /* uci.js unsets existing options only */
		this.map.changes.push([ 'unset', section_id, this.option ]);
}

form.AbstractValue = widgetClass('form.AbstractValue');
form.AbstractValue.prototype.write = recordWrite;
form.AbstractValue.prototype.remove = recordRemove;

const widgets = {};
[ 'ZoneSelect', 'ZoneForwards', 'IPSelect', 'NetworkSelect', 'DeviceSelect', 'UserSelect', 'GroupSelect' ].forEach(function(n) {
	widgets[n] = widgetClass('widgets.' + n);
});

function Option(section, cls, name, title, description, tab) {
	this.section = section;
	this.map = section.map;
	this.probe = { widget: cls.probeName, option: name, title: title, description: description,
		tab: tab || null, values: [], depends: [] };
	this.option = name;
}

Option.prototype.write = recordWrite;
Option.prototype.remove = recordRemove;

Option.prototype.value = function(key, label) {
	this.probe.values.push([ key, label === undefined ? null : label ]);
};

Option.prototype.depends = function(key, value) {
	this.probe.depends.push((typeof(key) == 'object') ? key : { [key]: value });
};

function Section(map, cls, args) {
	this.map = map;
	this.probe = { widget: cls.probeName, args: args, tabs: [], options: [] };
	this.children = [];
	this.formvalues = {};
	this.widgets = {};
}

Section.prototype.tab = function(name, title) { this.probe.tabs.push([ name, title ]); };

Section.prototype.option = function(cls, name, title, description) {
	return this._add(cls, name, title, description, null);
};

Section.prototype.taboption = function(tab, cls, name, title, description) {
	return this._add(cls, name, title, description, tab);
};

Section.prototype._add = function(cls, name, title, description, tab) {
	const o = new Option(this, cls, name, title, description, tab);
	this.children.push(o);
	return o;
};

Section.prototype.formvalue = function(section_id, option) { return this.formvalues[option]; };

Section.prototype.getUIElement = function(section_id, option) {
	const w = this.widgets[option] || (this.widgets[option] = { value: null, validated: 0 });
	return {
		setValue(v) { w.value = v; },
		getValue() { return w.value; },
		triggerValidation() { w.validated++; }
	};
};

function MapRecorder(config, title, description) {
	this.probe = { config: config, title: title, description: description };
	this.sections = [];
	this.changes = [];
	this.file = {};
}

MapRecorder.prototype.section = function(cls) {
	const s = new Section(this, cls, Array.prototype.slice.call(arguments, 1));
	this.sections.push(s);
	return s;
};

MapRecorder.prototype.render = function() { return this; };

form.Map = function(config, title, description) { return new MapRecorder(config, title, description); };
form.Map.probeName = 'form.Map';

/* the option/section properties a view assigned, functions as markers */
function plain(obj, skip) {
	const rv = {};
	for (const k of Object.keys(obj)) {
		if (skip.indexOf(k) >= 0)
			continue;
		rv[k] = (typeof(obj[k]) == 'function') ? '<function>' : obj[k];
	}
	return rv;
}

/* --- compile and run the view ---------------------------------------------- */

Object.assign(harness.modules, { rpc: rpc, form: form, 'tools.widgets': widgets });
harness.modules.view = { extend(props) { return props; } };

const props = harness.compile(source, viewFile);
out.methods = Object.keys(props).filter(function(k) { return typeof(props[k]) == 'function'; });

let map = null;

if (out.requires.some(function(r) { return r[0] == 'form'; }) && typeof(props.render) == 'function') {
	map = props.render();

	out.form = Object.assign({}, map.probe, {
		sections: map.sections.map(function(s) {
			return Object.assign({}, s.probe, plain(s, [ 'map', 'probe', 'children', 'formvalues', 'widgets' ]), {
				options: s.children.map(function(o) {
					return Object.assign({}, o.probe, plain(o, [ 'section', 'map', 'probe', 'option' ]));
				})
			});
		})
	});
}

function sectionOf(name) {
	/* a section is named by its UCI section type (NamedSection: the 2nd argument) */
	return map.sections.filter(function(s) {
		const type = (s.probe.widget == 'form.NamedSection') ? s.probe.args[1] : s.probe.args[0];
		return type == name;
	})[0];
}

/* --- one Save, by form.js's parse() rules (see the header) --------------------- */

function isEmpty(v) {
	return v == null || v === '' || (Array.isArray(v) && v.length == 0);
}

function isEqual(x, y) {
	if (Array.isArray(x) || Array.isArray(y))
		return Array.isArray(x) && Array.isArray(y) && x.length == y.length && x.every(function(v, i) { return v == y[i]; });
	return (x == null && y == null) || (x != null && y != null && String(x) === String(y));
}

function save(file, edits) {
	map.file = file;
	map.changes = [];
	const errors = [];

	for (const s of map.sections) {
		const named = (s.probe.widget == 'form.NamedSection'),
		      type = named ? s.probe.args[1] : s.probe.args[0],
		      sids = Object.keys(file).filter(function(sid) {
		      	return named ? (sid == s.probe.args[0] && file[sid]['.type'] == type) : file[sid]['.type'] == type;
		      });

		for (const sid of sids) {
			const cfg = file[sid], ed = edits[sid] || {}, fvals = {};
			const opts = s.children.filter(function(o) { return o.probe.widget != 'form.Button'; });

			/* renderWidget(): the file's value, else the default; then the user's edits */
			for (const o of opts) {
				const cval = (cfg[o.option] != null) ? cfg[o.option] : null;
				let v = (o.option in ed) ? ed[o.option] : ((cval != null) ? cval : (o.default != null ? o.default : null));
				if (o.probe.widget == 'form.Flag')
					v = (v == '1') ? '1' : '0';
				fvals[o.option] = v;
			}

			s.formvalues = fvals;

			for (const o of opts) {
				const cval = (cfg[o.option] != null) ? cfg[o.option] : null,
				      fval = fvals[o.option],
				      rmempty = (o.rmempty !== false), optional = (o.optional === true),
				      active = !o.probe.depends.length || o.probe.depends.some(function(d) {
				      	return Object.keys(d).every(function(k) { return isEqual(fvals[k], d[k]); });
				      }),
				      title = o.probe.title || o.option;

				if (!active) {
					o.remove(sid);
					continue;
				}

				/* the widget's validation: validate() per value; empty only when optional or rmempty */
				let valid = true;
				if (isEmpty(fval) && o.probe.widget != 'form.Flag' && !(rmempty || optional))
					valid = 'non-empty value';
				if (valid === true && typeof(o.validate) == 'function')
					for (const v of (Array.isArray(fval) ? fval : [ fval ])) {
						const rv = o.validate.call(o, sid, (v == null) ? '' : v);
						if (rv !== true) { valid = rv; break; }
					}

				if (valid !== true) {
					errors.push([ sid, o.option, 'Option "' + title + '" contains an invalid input value. ' + valid ]);
					continue;
				}

				if (o.probe.widget == 'form.Flag') {
					const def = (o.default != null) ? String(o.default) : '0';
					if (fval == def && (optional || rmempty))
						o.remove(sid);
					else
						o.write(sid, fval);
				}
				else if (isEmpty(fval)) {
					if (rmempty || optional)
						o.remove(sid);
					else
						errors.push([ sid, o.option, 'Option "' + title + '" must not be empty.' ]);
				}
				else if (!isEqual(cval, fval)) {
					o.write(sid, fval);
				}
			}
		}
	}

	return { changes: map.changes, errors: errors };
}

for (const p of probes) {
	if (p.save) {
		out.saves.push(save(p.save, p.edits || {}));
		continue;
	}

	const s = sectionOf(p.section || p.press);
	const o = s && s.children.filter(function(c) { return c.option == p.option; })[0];

	if (!o) {
		out.probes.push({ probe: p, error: 'no such option' });
		continue;
	}

	if (p.press) {
		o.onclick.call(o, {}, 'probe');
		const w = s.widgets[p.target || 'psk'] || {};
		out.probes.push({ probe: p, value: w.value, validated: w.validated || 0 });
	}
	else {
		s.formvalues = p.form || {};
		const rv = o.validate ? o.validate.call(o, 'probe', p.value) : true;
		out.probes.push({ probe: p, result: rv });
	}
}

process.stdout.write(JSON.stringify(out));
