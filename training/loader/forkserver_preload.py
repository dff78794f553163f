"""Imported by the loader's fork server alone, at its start (set_forkserver_preload): it dies with
the trainer that started it. Never import it anywhere else: it would tie that process to its parent."""

from training.loader.lifetime import die_with_parent

die_with_parent()
