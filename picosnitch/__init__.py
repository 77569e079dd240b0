"""picosnitch: per-executable network monitor built on eBPF."""

__version__ = "0.1.0"
