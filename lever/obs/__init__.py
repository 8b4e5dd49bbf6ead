"""Observability: Prometheus telemetry (``telemetry``), alert rules (``alerts``, the single source of
truth for the Helm chart's PrometheusRule), the Grafana dashboard (``dashboard``) and the in-training
divergence guard (``guard``).  Import from the submodules; this package imports nothing heavy."""
