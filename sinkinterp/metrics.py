"""Deprecated: the measurements live in :mod:`sinkinterp.measure` (one module per family)."""

from sinkinterp._deprecated import moved_names

_MOVED = {
    'MASSIVE_COLUMNS': 'sinkinterp.measure.common',
    'MassiveReducer': 'sinkinterp.measure.massive',
    'PerHeadReducer': 'sinkinterp.measure.geometry',
    'ProfileReducer': 'sinkinterp.measure.massive',
    'QKMassiveValues': 'sinkinterp.measure.qk',
    'ResidualProfile': 'sinkinterp.measure.massive',
    'SinkReducer': 'sinkinterp.measure.sinks',
    'SinkReport': 'sinkinterp.measure.sinks',
    'alpha_at': 'sinkinterp.measure.common',
    'check_positive': 'sinkinterp.measure.common',
    'find_massive_activations': 'sinkinterp.measure.massive',
    'head_frame': 'sinkinterp.measure.geometry',
    'massive_entries': 'sinkinterp.measure.massive',
    'massive_reducer': 'sinkinterp.measure.massive',
    'measure_heads': 'sinkinterp.measure.geometry',
    'qk_massive_values': 'sinkinterp.measure.qk',
    'qkv_geometry': 'sinkinterp.measure.geometry',
    'query_weights': 'sinkinterp.measure.common',
    'residual_profile': 'sinkinterp.measure.massive',
    'rotary_pairs': 'sinkinterp.measure.qk',
    'seen_counts': 'sinkinterp.measure.common',
    'sink_scores': 'sinkinterp.measure.sinks',
    'stable_massive_channels': 'sinkinterp.measure.massive',
    'token_text': 'sinkinterp.measure.common',
    'value_weighted_attention': 'sinkinterp.measure.value_weighted',
}
__getattr__, __dir__ = moved_names(__name__, _MOVED)
