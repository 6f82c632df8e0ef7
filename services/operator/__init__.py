"""The Kubernetes operator (kopf): a ``Guild`` resource becomes one operator's part of a
guild, running in a cluster.

``spec`` reads a Guild, ``render`` turns it into the objects it needs (pure: the same
Guild and generated secrets give the same objects), ``reconcile`` compares what is in
the cluster with that and says what to apply and what the Guild's status is, and
``handlers`` is the kopf shell that moves it to and from the API server (``kube``).
"""
