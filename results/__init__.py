"""Run records: the phase report model, YAML records, and (``snapproof results``) tools over them."""
