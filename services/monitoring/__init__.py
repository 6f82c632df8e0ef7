"""Monitoring as code: the Grafana dashboards shipped with the Helm chart
(``python -m services.monitoring.dashboards`` writes them); the Prometheus rules live
beside them in ``helm/constellation/files/rules``."""
