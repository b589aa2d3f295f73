"""Views: ways to look at a session beside the files (docs/views.md): the live status line,
the `top` dashboard, Prometheus /metrics, and the HTML report.
"""
