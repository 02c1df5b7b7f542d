"""Deprecated: the scan lives in :mod:`sinkinterp.measure.scan`."""

from sinkinterp._deprecated import moved_names

_MOVED = {
    'CORPUS_SOURCE': 'sinkinterp.measure.scan',
    'ScanResult': 'sinkinterp.measure.scan',
    'describe_model': 'sinkinterp.provenance',
    'package_versions': 'sinkinterp.provenance',
    'scan': 'sinkinterp.measure.scan',
    'scan_corpus': 'sinkinterp.measure.scan',
}
__getattr__, __dir__ = moved_names(__name__, _MOVED)
