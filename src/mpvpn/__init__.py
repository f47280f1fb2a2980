"""mpvpn: the orayboxvpn agent (SMPU multipath UDP over several carriers)."""

__version__ = "0.1.0"
