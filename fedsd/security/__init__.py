"""The trust boundary: TLS and device keys, the fleet-only proxy, wire format, untrusted values, DP accounting."""
