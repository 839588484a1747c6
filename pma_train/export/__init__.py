"""Export a pma-train checkpoint to a Hugging Face model directory (safetensors, shard by shard)."""

from pma_train.checkpoint.layout import CheckpointError
from pma_train.export.config import ExportConfig
from pma_train.export.exporter import ExportPlan, ExportSummary, export, prepare
from pma_train.export.hf import ExportError

__all__ = ["CheckpointError", "ExportConfig", "ExportError", "ExportPlan", "ExportSummary", "export", "prepare"]
