"""flaxlazy: deferred (lazy) parameter initialization for Flax.

Zero-cost shapes with ``abstract_init``, compiled materialization equal to
``module.init`` with ``materialize``, and initializer trees keyed by module path.
"""

# Not a public name: registers the self-checks behind _compat.fast_path and chunking_ok.
from flaxlazy._src import self_checks as _self_checks  # noqa: F401
from flaxlazy._src.abstract import abstract_init
from flaxlazy._src.cache import clear_caches
from flaxlazy._src.checkpoint.orbax_io import save
from flaxlazy._src.checkpoint.restore import CheckpointSource
from flaxlazy._src.checkpoint.restore import from_checkpoint
from flaxlazy._src.checkpoint.restore import restore
from flaxlazy._src.inspect_report import inspect
from flaxlazy._src.lazy import Lazy
from flaxlazy._src.lazy import lazy
from flaxlazy._src.materialize import materialize
from flaxlazy._src.report_types import Report
from flaxlazy._src.sharding import shardings
from flaxlazy._src.sources.from_safetensors.layouts import GPT2_HF
from flaxlazy._src.sources.from_safetensors.layouts import LLAMA_HF
from flaxlazy._src.sources.from_safetensors.source import SafetensorsSource
from flaxlazy._src.sources.from_safetensors.source import from_safetensors
from flaxlazy._src.specs import spec
from flaxlazy._src.summary import nbytes
from flaxlazy._src.summary import num_params
from flaxlazy._src.summary import summary
from flaxlazy._src.train_state import TrainState
from flaxlazy._src.train_state import abstract_train_state
from flaxlazy._src.train_state import init_train_state

__version__ = "0.1.0"

__all__ = (
    "CheckpointSource",
    "GPT2_HF",
    "LLAMA_HF",
    "Lazy",
    "Report",
    "SafetensorsSource",
    "TrainState",
    "abstract_init",
    "abstract_train_state",
    "clear_caches",
    "from_checkpoint",
    "from_safetensors",
    "init_train_state",
    "inspect",
    "lazy",
    "materialize",
    "nbytes",
    "num_params",
    "restore",
    "save",
    "shardings",
    "spec",
    "summary",
)
