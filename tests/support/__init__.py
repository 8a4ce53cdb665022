"""Test support: ``harness`` (ranks in spawned processes, Trainer job runs), ``helpers`` (configs,
training runs, the CLI, curve checks, fakes) and ``fault_worker.py`` (the CLI with a fault injected,
run as a script)."""
