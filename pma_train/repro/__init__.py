"""The PMA paper's findings at CPU scale (or paper scale by overrides), with pma-train's own trainer,
merge engine and evaluator: runs, merges, findings, report (pma-repro)."""
