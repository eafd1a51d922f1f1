"""The pipeline's stages, in the order they run. Adding a stage: one module here, one line below."""

from __future__ import annotations

from prune.pipeline.stage import Stage
from prune.pipeline.stages.analysis_tree import TreeStage
from prune.pipeline.stages.analysis_triggers import TriggersStage
from prune.pipeline.stages.compress import CompressStage
from prune.pipeline.stages.compress_score import CompressScoreStage
from prune.pipeline.stages.cost import CostStage
from prune.pipeline.stages.dense import DenseStage
from prune.pipeline.stages.export import ExportStage
from prune.pipeline.stages.finetune import FinetuneStage
from prune.pipeline.stages.frontier import FrontierStage
from prune.pipeline.stages.heal import HealStage
from prune.pipeline.stages.latency_model import LatencyModelStage
from prune.pipeline.stages.prune import PruneStage
from prune.pipeline.stages.quantize import QuantizeStage
from prune.pipeline.stages.report import ReportStage
from prune.pipeline.stages.score import ScoreStage
from prune.pipeline.stages.sweep import SweepStage

STAGES: list[type[Stage]] = [
    FinetuneStage,
    DenseStage,
    ScoreStage,
    SweepStage,
    PruneStage,
    CostStage,
    ExportStage,
    CompressScoreStage,
    LatencyModelStage,
    CompressStage,
    FrontierStage,
    HealStage,
    QuantizeStage,
    TreeStage,
    TriggersStage,
    ReportStage,
]
