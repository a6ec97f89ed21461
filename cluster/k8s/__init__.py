"""`pdserve k8s`: a cluster config rendered as a kustomize directory (docs/DEPLOY.md).

settings.py is the config's `k8s:` section; checks.py refuses what cannot run on Kubernetes;
hosts.py rewrites the config for the pods (DNS host names) into the ConfigMap; pods.py holds what
every pod shares (labels, probes, resources, volumes); nodes.py, gateway.py and policies.py build
the objects; render.py writes them; command.py is the subcommand.
"""
