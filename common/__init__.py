"""Shared, I/O-light code: settings, wire protocol, topology, reassembly, errors."""
