"""`lvd calibrate`: SVD's threshold calibration (SVD paper, App. E) as one command. Proxy models are trained on
subsets that each drop a fraction of the clips by one score, plus a baseline (no filter) and a random-drop
control of the same size; all are evaluated on the same held-out clips, and the filters that beat both become
a suggested curation `thresholds:` block.

    config.py   the calibration recipe (recipes/calibrate/*.yaml)
    arms.py     the arms: a held-out set and one key-list subset per arm, from the shard manifest
    runner.py   training the arms (here one after another, or as Ray tasks), resuming finished ones
    results.py  the table, the suggestion and the HTML page
"""
