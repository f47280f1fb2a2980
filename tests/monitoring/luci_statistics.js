// TEST FIXTURE: loads a luci-app-statistics graph definition and lists the
// rrd files and data sources its graphs would read, as luci-app-statistics
// does (openwrt/luci applications/luci-app-statistics/htdocs/luci-static/
// resources/statistics/rrdtool.js): the module is compiled with its
// 'require baseclass' in scope (luci.js L.require), rrdargs(graph, host,
// plugin, plugin_instance, null) is called for each plugin instance found on
// disk (scan), a single definition becomes a list (_forcelol), and the data
// types, instances and sources of each graph are found as _generic finds
// them. The rrd tree (what collectd's rrdtool plugin would have written:
// plugin instance -> type -> [type instances]) comes on stdin as JSON:
//   {"definition": path, "host": h, "plugin": p, "tree": {...}}
// Output: {"graphs": n, "sources": [[plugin instance, type, instance, ds]...]}
'use strict';
const fs = require('fs');

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const baseclass = { extend: (props) => props };
const src = fs.readFileSync(input.definition, 'utf8');
const def = new Function('baseclass', '_', src)(baseclass, (s) => s);
const isObject = (v) => v != null && typeof v == 'object';
const tree = input.tree;

const graph = {
	dataTypes: (host, plugin, pi) => Object.keys(tree[pi] || {}).sort(),
	dataInstances: (host, plugin, pi, type) => ((tree[pi] || {})[type] || []).slice().sort(),
};

let graphs = 0;
const sources = [];
for (const pi of Object.keys(tree)) {
	let optlist = def.rrdargs(graph, input.host, input.plugin, pi, null);
	optlist = isObject(optlist[0]) ? optlist : [ optlist ];
	for (const opts of optlist) {
		graphs++;
		const data_types = opts.data.types ? opts.data.types.slice() : [];
		if (!opts.data.types) {
			if (isObject(opts.data.instances))
				data_types.push(...Object.keys(opts.data.instances));
			else if (isObject(opts.data.sources))
				data_types.push(...Object.keys(opts.data.sources));
		}
		for (const type of data_types) {
			let data_instances;
			if (!opts.per_instance) {
				if (isObject(opts.data.instances) && Array.isArray(opts.data.instances[type]))
					data_instances = opts.data.instances[type];
				else
					data_instances = graph.dataInstances(input.host, input.plugin, pi, type);
			}
			if (!Array.isArray(data_instances) || data_instances.length == 0)
				data_instances = [ '' ];
			for (const inst of data_instances) {
				const dname = type + (inst.length ? '_' + inst : '');
				let data_sources = [ 'value' ];
				if (isObject(opts.data.sources)) {
					if (Array.isArray(opts.data.sources[dname]))
						data_sources = opts.data.sources[dname];
					else if (Array.isArray(opts.data.sources[type]))
						data_sources = opts.data.sources[type];
				}
				for (const ds of data_sources)
					sources.push([ pi, type, inst, ds ]);
			}
		}
	}
}
process.stdout.write(JSON.stringify({ graphs, title: def.title, sources }));
