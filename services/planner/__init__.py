"""The planner service: desired prefill and decode worker counts, exported for autoscalers."""
