"""Typed configs (`schema.py`: pma-train's job; `commands.py`: pma-eval's, pma-data's, pma-merge's) and
their validation (`checks.py`); imports nothing of the trainer, the model or megatron-core."""

from pma_train.config.schema import (  # noqa: F401
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    ScheduleConfig,
    MergeWeighting,
    InitMergeConfig,
    RetentionConfig,
    CheckpointConfig,
    TokenizerConfig,
    DataConfig,
    WandbConfig,
    LoggingConfig,
    TrackConfig,
    SpikeConfig,
    PerfConfig,
    RunConfig,
    JobConfig,
    to_config,
    to_job_config,
)
from pma_train.config.commands import EvalConfig, DataPrepConfig, MergeConfig  # noqa: F401
from pma_train.config.checks import (  # noqa: F401
    world_size_from_env,
    track_spacing_iters,
    track_rank_dir,
    METHODS,
    EXIT_SIGNALS,
    decay_window_iters,
    validate,
    check_writable,
    check_output_dirs,
    validate_eval,
    validate_merge,
)
