"""The content-addressed artifact store: local and S3 backends, unit leases and housekeeping.

It imports nothing from the domain code or the pipeline, so that everything above it (model
provisioning, the stages' caches, the pipeline, the CLI) can use it downward.
"""
