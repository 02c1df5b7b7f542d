"""Deprecated: the statistics live in :mod:`sinkinterp.stats`."""

from sinkinterp._deprecated import moved_names

_MOVED = {
    'Estimate': 'sinkinterp.stats',
    'MAX_RESAMPLES': 'sinkinterp.stats',
    'bootstrap_mean': 'sinkinterp.stats',
    'bootstrap_statistic': 'sinkinterp.stats',
    'paired_difference': 'sinkinterp.stats',
    'recovery_fraction': 'sinkinterp.stats',
}
__getattr__, __dir__ = moved_names(__name__, _MOVED)
