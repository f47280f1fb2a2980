"""The thin edges to the kernel (tun, UDP, netlink routes) and to OpenWrt's
programs (ubusd, logd, UCI files), each behind a small interface with a real
implementation for the router and one for a plain Linux host."""
