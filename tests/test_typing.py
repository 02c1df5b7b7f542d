"""The jaxtyping annotations are enforced in the test run (pyproject: --jaxtyping-packages)."""

import pytest
from jaxtyping import TypeCheckError

from sinkinterp.data import random_tokens
from sinkinterp.tiny import tiny_llama


def test_annotations_are_checked_during_tests():
    # seed is annotated as int; without the import hook torch would raise a plain TypeError.
    with pytest.raises(TypeCheckError):
        random_tokens(tiny_llama(), 1, 4, seed="0")
