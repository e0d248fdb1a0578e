"""The experiment runner: `peftlab train`, `sweep`, `report`, `demo` (a straight pipeline:
arguments -> data -> model -> trainer -> results.json)."""
