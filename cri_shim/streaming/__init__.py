"""The streaming server behind Exec, Attach and PortForward: SPDY/3.1 and
WebSocket upgrades on cri-shim's own HTTP server, as kubelet and crictl speak them."""
