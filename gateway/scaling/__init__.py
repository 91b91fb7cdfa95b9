"""Autoscaling a pool's Deployment from its builds: the pure decision and its actuator."""
