"""Date formats for the operator UI (settings.FORMAT_MODULE_PATH)."""
