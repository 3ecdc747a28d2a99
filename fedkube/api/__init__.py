"""Typed models shared by every role: configuration files, experiment statuses, CRDs."""
