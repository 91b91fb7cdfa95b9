"""Where replicas come from: static addresses, or the pods of a Kubernetes workload.

The only package besides `scaling/` that imports the Kubernetes client.
"""
