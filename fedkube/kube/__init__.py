"""Kubernetes clients shared by the roles that run in a cluster: credentials and the
shard-certificate request (a CertificateSigningRequest the operator signs)."""
