"""The pieces of benchmarks/merge_throughput.py, by concern: shared helpers (common), the inputs
(inputs), the measured subprocesses (workers), the engine profile (profiling), the report (report, plots)
and the comparison with Megatron-LM's weighted_merge.py (megatron_lm)."""
