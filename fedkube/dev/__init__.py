"""Developer tools: the demo, local processes and the tests' Kubernetes control plane.

Nothing under fedkube.dev is imported by the director, the envoy, the collaborator or the
operator (the import contracts check it).
"""
