"""Production controls: per-request settings (vLLM ``extra_args``), the deviation budget, and the metrics
that vLLM's ``/metrics`` serves."""
