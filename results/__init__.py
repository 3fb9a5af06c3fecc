"""Run records: the phase report model, YAML records, and (``python -m results``) tools over them."""
