"""pma-export of a DeepSpeed checkpoint (of pma-train's model): converted on the fly, then exported.

Every rank of the default process group converts its share (merge/ds/accept.py: pma-merge
output_format=torch_dist's code, one input, weight 1) into a hidden root beside the output
(`<output's parent>/.pma-deepspeed-<output's name>.<token>/`), the export reads that as any pma-train
checkpoint, and the root is removed afterwards, also on failure. What needs no checkpoint (the
options, the output, the model's names) is checked before the conversion starts; the architecture, as
for any checkpoint, against the converted one's shapes before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pma_train.checkpoint.layout import CheckpointError
from pma_train.export.config import ExportConfig
from pma_train.export.exporter import ExportPlan, ExportSummary, check_output, check_request, export, prepare
from pma_train.export.hf import ExportError
from pma_train.merge.ds import accept

OPTION = "checkpoint"


def check_before_conversion(cfg: ExportConfig) -> str:
    """Every process, before a process group: the checks an export of the converted checkpoint would make
    first, and the conversion's own (complete, safe, pma-train's parameter names). Returns what a dry
    run prints (the output's plan needs the conversion)."""
    check_request(cfg)
    if cfg.model is None:
        raise ExportError("model: give the model preset the DeepSpeed run trained, e.g. model=tiny")
    if cfg.output:
        check_output(Path(cfg.output), Path(cfg.checkpoint), cfg.overwrite)
    shapes = accept.check_convertible(cfg.checkpoint, OPTION)
    where = (f"{Path(cfg.output).parent}/{accept.PREFIX}{Path(cfg.output).name}" if cfg.output
             else f"<output's parent>/{accept.PREFIX}<output's name>")
    return (f"checkpoint {cfg.checkpoint}: a DeepSpeed checkpoint of {len(shapes)} tensors of pma-train's model; "
            f"an export converts it first into {where}.<token>/ (removed afterwards)")


def export_deepspeed(cfg: ExportConfig, log: Callable[[str], None] = print) -> tuple[ExportPlan, ExportSummary]:
    """On every rank of the default process group (check_before_conversion first): convert, export, remove."""
    output = Path(cfg.output)
    with accept.converted(cfg.checkpoint, output.parent, output.name, OPTION) as conversion:
        log(conversion.describe(OPTION))
        try:
            plan = prepare(replace(cfg, checkpoint=str(conversion.root)))
        except (ExportError, CheckpointError) as err:  # named by the checkpoint the user gave, not the temporary
            named = re.sub(re.escape(str(conversion.root)) + r"(/iter_\d+)?", f"{conversion.source} (converted)", str(err))
            raise type(err)(named) from None
        plan.converted_from = conversion.source
        return plan, export(plan)
