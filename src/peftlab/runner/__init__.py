"""The experiment runner: `peftlab train`, `sweep`, `report`, `demo`. One run is a straight pipeline (train.py:
arguments -> plan -> data -> encoded data -> model -> trainer -> results.json); a sweep runs many, one after
another or as Ray tasks on a cluster (sweep.py, ray_launcher.py)."""
