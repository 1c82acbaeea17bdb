"""Test support: deterministic container images and local registries.

Nothing here reaches the internet: images are assembled from the host's busybox
binary and served by local registries on 127.0.0.1.
"""
