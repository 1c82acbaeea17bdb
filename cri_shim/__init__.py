"""cri-shim: a Kubernetes CRI runtime that carries out every call through containerd's gRPC API."""

__version__ = "0.1.0"
