"""What the stage scripts (form_path.py, train.py, probe_ood.py) and the measurements share to start a run."""
