"""TEST FIXTURE: a minimal LuCI client environment for luci-app-mpvpn's views.

index.html + luci-stub.js imitate the small part of LuCI the views use;
server.py serves them with ubus-over-HTTP answered by a backend;
simagent.py answers `orayboxvpn status` from the real in-memory engine;
probe.js loads a view in node with recording stand-ins for rpc and form.
"""
