"""sinkinterp: find out why transformers pour attention onto their first token."""

from sinkinterp.errors import SinkInterpError
from sinkinterp.models import EMBEDDED_MODEL, ModelSource, load_model, model_source

__all__ = ["SinkInterpError", "EMBEDDED_MODEL", "ModelSource", "load_model", "model_source"]
__version__ = "0.1.0"
