"""buildkit-gateway: one BuildKit endpoint in front of a pool of buildkitd replicas."""

__version__ = "0.1.0"
