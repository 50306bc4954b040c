"""The reference backend: the tutorial's module code (see acf_fast.model.reference)."""

from ..model.reference import pair_scores, user_vectors

__all__ = ["pair_scores", "user_vectors"]
