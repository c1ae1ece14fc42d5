"""Prefect tasks: thin wrappers that call vptq/ and store/ and return small metadata.

Large tensors live in the job's workspace folder (VPTQ_HOME/work); task results hold paths,
hashes and figures only.
"""

from vptq_service.tasks.blocks import assemble_model, quantize_block
from vptq_service.tasks.calibration import sample_calibration
from vptq_service.tasks.evaluation import evaluate_model
from vptq_service.tasks.model import check_blocks, fetch_model, inspect_model
from vptq_service.tasks.publish import publish_artifact

__all__ = ["assemble_model", "check_blocks", "evaluate_model", "fetch_model", "inspect_model", "publish_artifact",
           "quantize_block", "sample_calibration"]
