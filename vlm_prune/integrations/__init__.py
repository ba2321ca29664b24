"""Integrations with other tools, behind extras: `lmms_eval` (the `lmms-eval` plugin and its local tasks)."""
